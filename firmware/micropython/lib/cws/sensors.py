# cws.sensors: configures the ESP32 agent's sensors (MicroPython subset; runs unchanged on CPython).
#
# build(spec, index) turns one entry of config.json's "sensors" list into a sensor object with
#   .stream (str)  .interval (float s)  .kind (type name)  .name ("sensors[i] (kind)")
#   .read(now_s) -> {field: number | str | bool}   (a telemetry reading's "values")
# Bad config raises ValueError naming where ("sensors[2] (bme280): 'address' must be ...").
# A hardware failure raises SensorError (an OSError) naming the sensor and what failed; the next
# read() tries again (re-probing the device), so a sensor plugged in later starts working.
#
# Drivers: simulated (the CPython agent's SimulatedSensor, value for value: same patterns,
# fields and seeded random walk through a Mersenne Twister identical to CPython's `random`),
# adc, dht22/dht11, bme280/bmp280 (I2C, forced mode, Bosch's integer compensation: exact and
# the same on every port). `machine` and `dht` are imported by the drivers that need them only.
# This module holds the configuration checks and build(); the drivers are in their own modules
# (cws.sensor_sim, sensor_adc, sensor_dht, sensor_bme280), imported only when configured, and the
# app drops this module after boot, so a board carries the code of the sensors it has, no more.
from cws.sensor import DEFAULT_INTERVAL, SensorError  # noqa: F401 - SensorError re-exported

TYPES = ("simulated", "adc", "dht22", "dht11", "bme280", "bmp280")
PATTERNS = ("sine", "ramp", "square", "random", "constant")
ATTENS = (0, 2.5, 6, 11)  # dB, in the order of ADC.ATTN_0DB, ATTN_2_5DB, ATTN_6DB, ATTN_11DB
_REQ = object()
_NAME_OK = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"


def _is_num(v):
    t = type(v)
    return (t is int or t is float) and v == v and v - v == 0  # no bool, NaN or infinity


def _is_name(v):
    if type(v) is not str or not 0 < len(v) < 64 or v[0] in "_.-":
        return False
    for ch in v:
        if ch not in _NAME_OK:
            return False
    return True


class _Spec:
    # one "sensors" entry being validated: every accessor names the entry and the key on error

    REQ = _REQ
    PATTERNS = PATTERNS
    ATTENS = ATTENS

    def __init__(self, spec, where):
        self.s = spec
        self.where = where
        self.seen = ["type"]

    def bad(self, key, what, v):
        raise ValueError("%s: '%s' must be %s, got %r" % (self.where, key, what, v))

    def get(self, key, default, what):
        self.seen.append(key)
        v = self.s.get(key, default)
        if v is _REQ:
            raise ValueError("%s: '%s' is required (%s)" % (self.where, key, what))
        return v

    def num(self, key, default, lo=None, hi=None, positive=False):
        what = "a number"
        if positive:
            what += " > 0"
        if lo is not None:
            what += " %s..%s" % (lo, hi)
        v = self.get(key, default, what)
        if not _is_num(v) or (positive and v <= 0) or (lo is not None and not lo <= v <= hi):
            self.bad(key, what, v)
        return float(v)

    def int(self, key, default, lo, hi):
        what = "an int %d..%d" % (lo, hi)
        v = self.get(key, default, what)
        if type(v) is not int or not lo <= v <= hi:
            self.bad(key, what, v)
        return v

    def name(self, key, default):
        what = "a name of 1-63 characters from A-Z a-z 0-9 _ . - starting with a letter or digit"
        v = self.get(key, default, what)
        if not _is_name(v):
            self.bad(key, what, v)
        return v

    def choice(self, key, options, default):
        what = "one of " + ", ".join([repr(o) for o in options])
        v = self.get(key, default, what)
        if type(v) is bool or v not in options:
            self.bad(key, what, v)
        return v

    def names(self, key, default, most):
        what = "a list of 1..%d distinct names" % most
        v = self.get(key, default, what)
        if type(v) is not list or not 0 < len(v) <= most or not all(_is_name(x) for x in v) or len(set(v)) < len(v):
            self.bad(key, what, v)
        return v

    def done(self):
        for k in self.s:
            if k not in self.seen:
                raise ValueError("%s: unknown key %r (known: %s)" % (self.where, k, ", ".join(self.seen)))


def build(spec, index, start=None):
    """The sensor for config.json's sensors[index]; ValueError naming index and key if bad.

    ``start`` (seconds) is where a simulated sensor's time starts (default: its first read).
    """
    if type(spec) is not dict:
        raise ValueError("sensors[%d]: must be an object with a \"type\", got %r" % (index, spec))
    kind = spec.get("type")
    if kind not in TYPES:
        raise ValueError("sensors[%d]: 'type' must be one of %s, got %r" % (index, ", ".join(TYPES), kind))
    c = _Spec(spec, "sensors[%d] (%s)" % (index, kind))
    if kind == "simulated":
        from cws.sensor_sim import Simulated

        return Simulated(c, index, start)
    if kind == "adc":
        from cws.sensor_adc import Adc

        return Adc(c, index)
    if kind == "dht22" or kind == "dht11":
        from cws.sensor_dht import Dht

        return Dht(c, index, kind)
    from cws.sensor_bme280 import Bme280

    return Bme280(c, index, kind)


def build_all(specs, start=None):
    """Every sensor of config.json's "sensors" list (ValueError at the first bad entry)."""
    if type(specs) is not list:
        raise ValueError("sensors: must be a list, got %r" % (specs,))
    return [build(s, i, start) for i, s in enumerate(specs)]
