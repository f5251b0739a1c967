"""Fake ESP32 ``dht`` module (DHT11/DHT22) for the MicroPython unix port and CPython (tests only).

Put ``tests/firmware/board`` on MICROPYPATH / PYTHONPATH. Sensors come from the JSON file named
by ``CWS_FAKE_HW`` (read at import; ``reload()`` reads it again), keyed by GPIO number:

  "dht": {"4": {"temperature": 21.5, "humidity": 40.0, "fail": 0}}

"temperature" and "humidity" are numbers, or lists cycled one entry per successful measure();
"fail": the first N measure() calls on that pin raise OSError(110) ETIMEDOUT, as a real sensor
that does not answer; a pin with no entry never answers. DHT11 returns whole numbers (ints),
DHT22 tenths (floats), like the real driver. ``measures`` counts measure() calls per pin.

API: DHT11(pin), DHT22(pin) (pin: machine.Pin or int) with measure(), temperature(), humidity();
reload(); measures {pin: calls}.
"""

import _fakehw

ETIMEDOUT = 110
_hw = {}
_fails = {}
_pos = {}
measures = {}


def reload():
    """(Re)read the CWS_FAKE_HW JSON file; failure and call counters start again."""
    global _hw
    hw = _fakehw.load()
    _hw = hw
    _fails.clear()
    _pos.clear()
    measures.clear()
    for pin, d in hw.get("dht", {}).items():
        _fails[int(pin)] = d.get("fail", 0)


reload()


def _pick(v, i):
    if type(v) is list:
        return v[i % len(v)]
    return v


class DHTBase:
    def __init__(self, pin):
        self.pin = pin.id if hasattr(pin, "id") else pin
        self._t = 0
        self._h = 0

    def measure(self):
        p = self.pin
        measures[p] = measures.get(p, 0) + 1
        d = _hw.get("dht", {}).get(str(p))
        if d is None:
            raise OSError(ETIMEDOUT)
        if _fails.get(p, 0) > 0:
            _fails[p] -= 1
            raise OSError(ETIMEDOUT)
        i = _pos.get(p, 0)
        _pos[p] = i + 1
        self._t = _pick(d.get("temperature", 21.5), i)
        self._h = _pick(d.get("humidity", 40.0), i)


class DHT11(DHTBase):
    def temperature(self):
        return int(self._t)

    def humidity(self):
        return int(self._h)


class DHT22(DHTBase):
    def temperature(self):
        return int(round(self._t * 10)) / 10

    def humidity(self):
        return int(round(self._h * 10)) / 10
