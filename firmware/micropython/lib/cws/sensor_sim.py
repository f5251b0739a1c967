# cws.sensor_sim: the simulated sensor, value for value the CPython agent's SimulatedSensor
# (sine, ramp, square, seeded random walk, constant), with a Mersenne Twister identical to CPython's.
import math

from cws.sensor import Sensor


def _seed():
    try:
        from os import urandom

        b = urandom(4)
        return b[0] | b[1] << 8 | b[2] << 16 | (b[3] & 0x3F) << 24
    except (ImportError, OSError):
        from time import time

        return int(time() * 1000) & 0x3FFFFFFF


class Simulated(Sensor):
    # sine, ramp, random walk or constant per field, like edge_agent.sensors.SimulatedSensor;
    # t = now_s - start (start = the first read's now_s unless given)

    kind = "simulated"

    def __init__(self, c, index, start=None):
        self._common(c, index)
        f = self.fields = c.names("fields", ["value"], 16)
        self.pattern = c.choice("pattern", c.PATTERNS, "sine")
        self.amplitude = c.num("amplitude", 10.0)
        self.offset = c.num("offset", 20.0)
        self.period = c.num("period", 60.0, positive=True)
        seed = c.get("seed", None, "an int or null")
        if seed is not None and type(seed) is not int:
            c.bad("seed", "an int or null", seed)
        self.seed = seed
        c.done()
        self._start = None if start is None else float(start)
        self._rng = None
        if self.pattern == "random":
            from cws.sensor_mt import MT

            self._rng = MT(_seed() if seed is None else seed)
            self._walk = [self.offset] * len(f)

    def read(self, now_s):
        if self._start is None:
            self._start = float(now_s)
        t = now_s - self._start
        out = {}
        pat = self.pattern
        off = self.offset
        amp = self.amplitude
        for i, name in enumerate(self.fields):
            if pat == "sine":
                v = off + amp * math.sin(2 * math.pi * t / self.period + i * math.pi / 3)
            elif pat == "ramp":
                v = off + amp * ((t / self.period) % 1.0)
            elif pat == "square":
                v = off + amp if (t / self.period) % 1.0 < 0.5 else off - amp
            elif pat == "random":
                w = self._walk[i] + self._rng.uniform(-1, 1) * amp * 0.05
                v = self._walk[i] = min(max(w, off - amp), off + amp)
            else:
                v = off
            out[name] = round(v, 3)
        return out


