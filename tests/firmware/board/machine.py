"""Fake ESP32 ``machine`` module for the MicroPython unix port and CPython (tests only).

Put ``tests/firmware/board`` on MICROPYPATH (MicroPython: a ``machine.py`` there overrides the
unix port's small built-in ``machine``) or PYTHONPATH (CPython). Behaviour comes from the JSON
file named by the environment variable ``CWS_FAKE_HW`` (no variable, or no file: defaults),
read once at import; ``reload()`` reads it again. Keys used here (all optional):

  "adc":         {"34": [1650000, 1700000]}   # microvolts per pin, cycled one value per read
                                              # (read_u16 = uv scaled to 0..3.3 V; read = 12 bit)
  "i2c":         {"118": {"regs": "hex", "fail": 0}}
                 # a device per 7-bit address (decimal key): a 256-byte register file (shorter hex
                 # is zero-padded); writes store into it; the first "fail" transactions raise
                 # OSError(EIO); an address not listed raises OSError(19) ENODEV like the real bus
  "reset_cause": 1                            # PWRON_RESET (default)
  "unique_id":   "246f28a1b2c3"               # 6 bytes as hex

API: Pin(id, mode=-1, pull=-1, value=None) with IN/OUT/OPEN_DRAIN/PULL_UP/PULL_DOWN,
value()/on()/off()/__call__; ADC(pin, atten=None) with ATTN_0DB/2_5DB/6DB/11DB, atten(),
width(), read_u16(), read_uv(), read(); I2C(id, scl=, sda=, freq=) and SoftI2C(scl, sda, freq=)
with scan(), readfrom_mem(), readfrom_mem_into(), writeto_mem(), readfrom(), writeto();
reset() and soft_reset() exit the process with status 75 (the harness restarts it: a reboot);
deepsleep(ms) too; reset_cause(); PWRON_RESET=1 HARD_RESET=2 WDT_RESET=3 DEEPSLEEP_RESET=4
SOFT_RESET=5; unique_id(); freq(); idle(); lightsleep(ms); WDT(id=0, timeout=5000).feed()
(counts in WDT.feeds); RTC().datetime([tuple]); disable_irq()/enable_irq(state).
"""

import sys
import time

import _fakehw

RESET_EXIT = 75  # process exit status that means "the board reset itself"
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
ENODEV = 19
EIO = 5

_hw = {}
_adc_pos = {}
_devices = {}


def reload():
    """(Re)read the CWS_FAKE_HW JSON file (missing variable or file: every default)."""
    global _hw
    hw = _fakehw.load()
    _hw = hw
    _adc_pos.clear()
    _devices.clear()
    for addr, dev in hw.get("i2c", {}).items():
        regs = bytearray(256)
        raw = bytes.fromhex(dev.get("regs", "")) if hasattr(bytes, "fromhex") else _unhex(dev.get("regs", ""))
        regs[:len(raw)] = raw
        _devices[int(addr)] = [regs, dev.get("fail", 0)]


def _unhex(s):
    from binascii import unhexlify

    return unhexlify(s)


def config():
    """The parsed fake-hardware JSON (a dict)."""
    return _hw


reload()


def _exit_reset():
    sys.exit(RESET_EXIT)


def reset():
    _exit_reset()


def soft_reset():
    _exit_reset()


def deepsleep(ms=0):
    _exit_reset()


def lightsleep(ms=0):
    if ms:
        time.sleep(ms / 1000)


def idle():
    pass


def reset_cause():
    return _hw.get("reset_cause", PWRON_RESET)


def unique_id():
    h = _hw.get("unique_id", "246f28a1b2c3")
    return bytes.fromhex(h) if hasattr(bytes, "fromhex") else _unhex(h)


_freq = [240000000]


def freq(hz=None):
    if hz is None:
        return _freq[0]
    _freq[0] = hz


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, value=None):
        if type(id) is not int or not 0 <= id <= 48:
            raise ValueError("invalid pin")
        self.id = id
        self.mode = mode
        self.pull = pull
        self._v = 0 if value is None else int(bool(value))

    def init(self, mode=-1, pull=-1, value=None):
        self.mode = mode
        self.pull = pull
        if value is not None:
            self._v = int(bool(value))

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = int(bool(v))

    __call__ = value

    def on(self):
        self._v = 1

    def off(self):
        self._v = 0

    def irq(self, handler=None, trigger=3):
        return None

    def __repr__(self):
        return f"Pin({self.id})"


def _pin_id(pin):
    return pin.id if isinstance(pin, Pin) else pin


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_12BIT = 3

    def __init__(self, pin, atten=None):
        self.pin = _pin_id(pin)
        self._atten = self.ATTN_0DB if atten is None else atten

    def atten(self, a=None):
        if a is None:
            return self._atten
        if a not in (0, 1, 2, 3):
            raise ValueError("invalid attenuation")
        self._atten = a

    def width(self, w=None):
        return self.WIDTH_12BIT

    def read_uv(self):
        key = str(self.pin)
        values = _hw.get("adc", {}).get(key, 0)
        if type(values) is not list:
            values = [values]
        values = values or [0]
        i = _adc_pos.get(key, 0)
        _adc_pos[key] = i + 1
        return int(values[i % len(values)])

    def read_u16(self):
        return min(65535, self.read_uv() * 65535 // 3300000)

    def read(self):
        return self.read_u16() >> 4


class I2C:
    def __init__(self, id=0, scl=None, sda=None, freq=400000, timeout=50000):
        if type(id) is not int or not 0 <= id <= 1:
            raise ValueError(f"I2C({id}) doesn't exist")
        self.id = id
        self.scl = _pin_id(scl)
        self.sda = _pin_id(sda)
        self.freq = freq
        self._ptr = {}

    def _dev(self, addr):
        d = _devices.get(addr)
        if d is None:
            raise OSError(ENODEV)
        if d[1] > 0:
            d[1] -= 1
            raise OSError(EIO)
        return d[0]

    def scan(self):
        return sorted(_devices)

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        regs = self._dev(addr)
        return bytes(regs[(memaddr + i) & 0xFF] for i in range(nbytes))

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        regs = self._dev(addr)
        for i in range(len(buf)):
            buf[i] = regs[(memaddr + i) & 0xFF]

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        regs = self._dev(addr)
        for i in range(len(buf)):
            regs[(memaddr + i) & 0xFF] = buf[i]

    def writeto(self, addr, buf, stop=True):
        regs = self._dev(addr)
        if len(buf):
            self._ptr[addr] = buf[0]
            for i in range(1, len(buf)):
                regs[(buf[0] + i - 1) & 0xFF] = buf[i]
        return len(buf)

    def readfrom(self, addr, nbytes, stop=True):
        return self.readfrom_mem(addr, self._ptr.get(addr, 0), nbytes)

    def readfrom_into(self, addr, buf, stop=True):
        self.readfrom_mem_into(addr, self._ptr.get(addr, 0), buf)


class SoftI2C(I2C):
    def __init__(self, scl, sda, freq=400000, timeout=50000):
        self.id = -1
        self.scl = _pin_id(scl)
        self.sda = _pin_id(sda)
        self.freq = freq
        self._ptr = {}


class WDT:
    feeds = 0  # feed() calls, all watchdogs together

    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout

    def feed(self):
        WDT.feeds += 1


def _days(y, m, d):
    # days since 1970-01-01 (proleptic Gregorian)
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


class RTC:
    _offset = 0  # seconds added to the host clock, shared like the one real RTC

    def datetime(self, dt=None):
        """(year, month, day, weekday, hours, minutes, seconds, subseconds) in UTC; set with a tuple."""
        if dt is None:
            now = time.time() + RTC._offset
            t = time.gmtime(int(now))
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], int((now - int(now)) * 1000000))
        secs = _days(dt[0], dt[1], dt[2]) * 86400 + dt[4] * 3600 + dt[5] * 60 + dt[6]
        RTC._offset = secs - int(time.time())

    def init(self, dt):
        self.datetime(dt)
