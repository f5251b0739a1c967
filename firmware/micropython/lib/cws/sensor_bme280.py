# cws.sensor_bme280: BME280/BMP280 over I2C, forced mode, Bosch's integer compensation (exact
# and identical on every port, single-precision floats or not).
from cws.sensor import Sensor, SensorError, _hardware, _machine

try:
    from time import sleep_ms as _sleep_ms
except ImportError:  # CPython
    from time import sleep as _sleep

    def _sleep_ms(ms):
        _sleep(ms / 1000)


def _u16(b, i):
    return b[i] | b[i + 1] << 8


def _s16(b, i):
    v = b[i] | b[i + 1] << 8
    return v - 65536 if v & 0x8000 else v


def _s8(v):
    return v - 256 if v & 0x80 else v


def bme280_calibration(a, b=None):
    """(T1, T2, T3, P1..P9, H1..H6) from registers 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7)."""
    cal = [_u16(a, 0), _s16(a, 2), _s16(a, 4), _u16(a, 6)]
    for i in range(8, 24, 2):
        cal.append(_s16(a, i))
    if b is None:
        cal += [0, 0, 0, 0, 0, 0]
    else:
        cal += [a[25], _s16(b, 0), b[2], _s8(b[3]) * 16 | (b[4] & 0x0F), _s8(b[5]) * 16 | b[4] >> 4, _s8(b[6])]
    return tuple(cal)


def bme280_raw(data):
    """(adc_T, adc_P, adc_H or None) from the data registers 0xF7.. (8 bytes; 6 for a BMP280)."""
    return (data[3] << 12 | data[4] << 4 | data[5] >> 4, data[0] << 12 | data[1] << 4 | data[2] >> 4,
            data[6] << 8 | data[7] if len(data) >= 8 else None)


def _cdiv(n, d):  # C's truncating integer division
    q = n // d
    if q < 0 and q * d != n:
        q += 1
    return q


def bme280_compensate(cal, adc_t, adc_p, adc_h=None):
    """Bosch's BME280_compensate_T_int32, _P_int64 and bme280_compensate_H_int32.

    Returns (T in 0.01 °C, P in Pa as Q24.8, H in %RH as Q22.10 or None). Plain integer
    arithmetic: exact on every port (intermediates past 31 bits become long ints).
    """
    T1, T2, T3, P1, P2, P3, P4, P5, P6, P7, P8, P9, H1, H2, H3, H4, H5, H6 = cal
    v1 = (((adc_t >> 3) - (T1 << 1)) * T2) >> 11
    d = (adc_t >> 4) - T1
    v2 = (((d * d) >> 12) * T3) >> 14
    t_fine = v1 + v2
    t = (t_fine * 5 + 128) >> 8

    v1 = t_fine - 128000
    v2 = v1 * v1 * P6
    v2 = v2 + ((v1 * P5) << 17)
    v2 = v2 + (P4 << 35)
    v1 = ((v1 * v1 * P3) >> 8) + ((v1 * P2) << 12)
    v1 = (((1 << 47) + v1) * P1) >> 33
    if v1 == 0:
        p = 0
    else:
        p = 1048576 - adc_p
        p = _cdiv(((p << 31) - v2) * 3125, v1)
        v1 = (P9 * (p >> 13) * (p >> 13)) >> 25
        v2 = (P8 * p) >> 19
        p = (((p + v1 + v2) >> 8) + (P7 << 4)) & 0xFFFFFFFF

    if adc_h is None:
        return t, p, None
    x = t_fine - 76800
    x = ((((adc_h << 14) - (H4 << 20) - (H5 * x)) + 16384) >> 15) * (
        ((((((x * H6) >> 10) * (((x * H3) >> 11) + 32768)) >> 10) + 2097152) * H2 + 8192) >> 14)
    x = x - (((((x >> 15) * (x >> 15)) >> 7) * H1) >> 4)
    x = 0 if x < 0 else x
    x = 419430400 if x > 419430400 else x
    return t, p, x >> 12


def bme280_values(cal, data):
    """The reading's values from raw data registers: temperature °C, pressure hPa, humidity %."""
    adc_t, adc_p, adc_h = bme280_raw(data)
    t, p, h = bme280_compensate(cal, adc_t, adc_p, adc_h)
    out = {"temperature": t / 100, "pressure": ((p + 128) >> 8) / 100}
    if h is not None:
        out["humidity"] = ((h * 100 + 512) >> 10) / 100
    return out


class Bme280(Sensor):
    # forced mode, oversampling x1 everywhere, IIR filter off (Bosch's "weather monitoring")

    def __init__(self, c, index, kind):
        self.kind = kind
        self._common(c, index)
        bus = c.get("i2c", 0, "an I2C bus number 0..7 or \"soft\"")
        if bus != "soft" and (type(bus) is not int or not 0 <= bus <= 7):
            c.bad("i2c", "an I2C bus number 0..7 or \"soft\"", bus)
        scl = c.int("scl", 22, 0, 63)
        sda = c.int("sda", 21, 0, 63)
        self.address = c.int("address", 0x76, 0, 127)
        freq = c.int("freq", 100000, 10000, 1000000)
        c.done()
        m = _machine(self.name)
        pins = (_hardware(self.name, m.Pin, scl), _hardware(self.name, m.Pin, sda))
        if bus == "soft":
            self._i2c = _hardware(self.name, lambda: m.SoftI2C(scl=pins[0], sda=pins[1], freq=freq))
        else:
            self._i2c = _hardware(self.name, lambda: m.I2C(bus, scl=pins[0], sda=pins[1], freq=freq))
        self.bus = "%s I2C %s (scl %d, sda %d)" % ("soft" if bus == "soft" else "hardware", bus, scl, sda)
        self._buf = bytearray(8)
        self._cal = None
        self.chip = None

    def _reg(self, reg, value):
        self._buf[0] = value
        self._i2c.writeto_mem(self.address, reg, memoryview(self._buf)[:1])

    def _setup(self):
        i2c = self._i2c
        buf = self._buf
        i2c.readfrom_mem_into(self.address, 0xD0, memoryview(buf)[:1])
        chip = buf[0]
        if chip != 0x60 and not 0x56 <= chip <= 0x58:
            raise self.fail("chip id 0x%02x at I2C address 0x%02x is not a BME280 (0x60) or BMP280 (0x58)"
                            % (chip, self.address))
        a = i2c.readfrom_mem(self.address, 0x88, 26)
        b = i2c.readfrom_mem(self.address, 0xE1, 7) if chip == 0x60 else None
        cal = bme280_calibration(a, b)
        if cal[0] == 0 or cal[3] == 0:
            raise self.fail("calibration registers at I2C address 0x%02x read as zero" % self.address)
        self._reg(0xF5, 0x00)  # config: IIR filter off
        self.chip = chip
        self._cal = cal

    def read(self, now_s):
        try:
            if self._cal is None:
                self._setup()
            hum = self.chip == 0x60
            if hum:
                self._reg(0xF2, 0x01)  # ctrl_hum: osrs_h x1 (takes effect with the ctrl_meas write)
            self._reg(0xF4, 0x25)  # ctrl_meas: osrs_t x1, osrs_p x1, forced mode
            # datasheet 9.1: t_max = 1.25 + 2.3 + (2.3 + 0.575) [+ (2.3 + 0.575)] ms
            _sleep_ms(10 if hum else 7)
            buf = self._buf
            for _ in range(5):
                self._i2c.readfrom_mem_into(self.address, 0xF3, memoryview(buf)[:1])
                if not buf[0] & 0x08:  # status.measuring
                    break
                _sleep_ms(2)
            else:
                raise self.fail("measurement at I2C address 0x%02x did not finish" % self.address)
            data = memoryview(buf)[:8 if hum else 6]
            self._i2c.readfrom_mem_into(self.address, 0xF7, data)
        except SensorError:
            self._cal = None
            raise
        except OSError as e:
            self._cal = None
            raise self.fail("no answer from I2C address 0x%02x on %s" % (self.address, self.bus), e)
        if buf[3] == 0x80 and buf[4] == 0 and buf[5] >> 4 == 0:
            self._cal = None
            raise self.fail("no measurement at I2C address 0x%02x (data registers at reset value)" % self.address)
        return bme280_values(self._cal, data)


