# cws.sensor: what every sensor driver shares at run time (the base class, SensorError, the
# hardware helpers). The drivers live in sensor_sim, sensor_adc, sensor_dht and sensor_bme280;
# cws.sensors checks the configuration and builds them, and is dropped after boot.

class SensorError(OSError):
    pass


DEFAULT_INTERVAL = 30.0


def _why(e):
    a = e.args
    if a and type(a[0]) is int:
        try:
            from errno import errorcode

            return "%s (errno %d)" % (errorcode.get(a[0], "OSError"), a[0])
        except ImportError:
            return "errno %d" % a[0]
    return str(e) or type(e).__name__


class Sensor:
    kind = "sensor"

    def _common(self, c, index):
        self.name = "sensors[%d] (%s)" % (index, self.kind)
        self.stream = c.name("stream", c.REQ)
        self.interval = c.num("interval", DEFAULT_INTERVAL, 0.001, 86400)

    def fail(self, what, e=None):
        return SensorError("%s: %s%s" % (self.name, what, "" if e is None else ": " + _why(e)))

    def read(self, now_s):
        raise NotImplementedError


def _hardware(where, make, *args):
    # create a machine/dht object; the port's ValueError ("invalid pin") is a config error
    try:
        return make(*args)
    except (ValueError, TypeError) as e:
        raise ValueError("%s: %s" % (where, e))
    except OSError as e:
        raise SensorError("%s: %s" % (where, _why(e)))


def _machine(where):
    try:
        import machine
    except ImportError:
        raise ValueError("%s: this port has no 'machine' module (use a simulated sensor)" % where)
    return machine


