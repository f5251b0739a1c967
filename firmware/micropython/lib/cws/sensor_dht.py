# cws.sensor_dht: DHT22/DHT11 temperature and humidity (the port's dht module), retried, rate-limited.
from cws.sensor import Sensor, _hardware, _machine

DHT_MIN_GAP = 2  # s between two DHT measurements; a read sooner returns the cached values
DHT_RETRIES = 3  # extra measure() attempts after an OSError


class Dht(Sensor):
    def __init__(self, c, index, kind):
        self.kind = kind
        self._common(c, index)
        self.pin = c.int("pin", c.REQ, 0, 63)
        c.done()
        m = _machine(self.name)
        try:
            import dht
        except ImportError:
            raise ValueError("%s: this port has no 'dht' module" % self.name)
        make = dht.DHT22 if kind == "dht22" else dht.DHT11
        self._dev = _hardware(self.name, make, _hardware(self.name, m.Pin, self.pin))
        self._last = None
        self._at = 0

    def read(self, now_s):
        if self._last is not None and 0 <= now_s - self._at < DHT_MIN_GAP:
            return dict(self._last)
        err = None
        for _ in range(1 + DHT_RETRIES):
            try:
                d = self._dev
                d.measure()
                t = d.temperature()
                h = d.humidity()
            except OSError as e:
                err = e
                continue
            if type(t) is float:
                t = round(t, 1)
                h = round(h, 1)
            self._last = {"temperature": t, "humidity": h}
            self._at = now_s
            return dict(self._last)
        raise self.fail("no reading from the %s on pin %d after %d attempts" % (self.kind.upper(), self.pin,
                                                                                 1 + DHT_RETRIES), err)


