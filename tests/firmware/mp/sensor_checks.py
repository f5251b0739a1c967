# The firmware's sensor drivers (cws.sensors), run unchanged on MicroPython's unix port and
# CPython (both with the fake ESP32 hardware of tests/firmware/board) and, for the parts that
# need no hardware, on the 32-bit WebAssembly port. Needs on the path: firmware/micropython/lib,
# the data module fw_sensor_cases (written by tests/test_firmware_sensors.py: JSON text in DATA)
# and, when its "hardware" is true, tests/firmware/board with CWS_FAKE_HW naming the fake
# hardware's JSON. Checks that need no reference are asserted here; the values CPython judges
# (simulated series, BME280 compensation, error messages) are printed as one line
# "RESULT {json}" with every float as the hex of its float64, so ports compare bit for bit.
import struct

try:
    import json
except ImportError:
    import ujson as json

from binascii import hexlify, unhexlify

from cws import sensor_bme280 as bme280mod
from cws import sensors
from cws.sensors import SensorError

import fw_sensor_cases

C = json.loads(fw_sensor_cases.DATA)
checks = [0]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    checks[0] += 1


def enc(v):
    if type(v) is float:
        return "f:" + str(hexlify(struct.pack(">d", v)), "ascii")
    if type(v) is dict:
        return {k: enc(x) for k, x in v.items()}
    if type(v) in (list, tuple):
        return [enc(x) for x in v]
    return v


def raises(exc, fn, *args):
    try:
        fn(*args)
    except exc as e:
        return str(e)
    raise AssertionError("%r did not raise %s" % (args, exc.__name__))


def sim_series():
    out = []
    for spec in C["sim"]:
        s = sensors.build(spec, 0, 0)
        check(s.kind == "simulated" and s.stream == spec["stream"], "simulated attributes")
        out.append([s.read(t) for t in C["sim_times"]])
    # deterministic for a seed: a second sensor with the same config gives the same series
    spec = C["sim"][-1]
    a = sensors.build(spec, 0, 0)
    b = sensors.build(spec, 0, 0)
    check([a.read(t) for t in C["sim_times"]] == [b.read(t) for t in C["sim_times"]], "same seed, same series")
    # start defaults to the first read
    c = sensors.build(C["sim"][0], 0)
    d = sensors.build(C["sim"][0], 0, 1000)
    check(c.read(1000) == d.read(1000) and c.read(1012.5) == d.read(1012.5), "start = first read")
    return out


def bme_cases():
    out = []
    for cal_a, cal_b, data in C["bme"]:
        cal = bme280mod.bme280_calibration(unhexlify(cal_a), unhexlify(cal_b) if cal_b else None)
        raw = bme280mod.bme280_raw(unhexlify(data))
        ints = bme280mod.bme280_compensate(cal, raw[0], raw[1], raw[2])
        out.append([list(cal), list(raw), list(ints), bme280mod.bme280_values(cal, unhexlify(data))])
    return out


def config_errors():
    out = []
    for spec, index in C["bad"]:
        out.append(raises(ValueError, sensors.build, spec, index))
    out.append(raises(ValueError, sensors.build_all, {"type": "adc"}))
    return out


def hardware():
    import dht
    import machine

    hw = C["hw"]
    check(issubclass(SensorError, OSError), "SensorError is an OSError")

    # BME280 on hardware I2C: registers written, values = the pure compensation of the same registers
    spec = {"type": "bme280", "stream": "climate", "interval": 30, "i2c": 0, "scl": 22, "sda": 21, "address": 118}
    s = sensors.build(spec, 3)
    v = s.read(0)
    regs = unhexlify(hw["i2c"]["118"]["regs"])
    cal = bme280mod.bme280_calibration(regs[0x88:0x88 + 26], regs[0xE1:0xE1 + 7])
    check(v == bme280mod.bme280_values(cal, regs[0xF7:0xFF]), "bme280 over I2C = compensation of its registers")
    check(sorted(v) == ["humidity", "pressure", "temperature"], "bme280 fields")
    bus = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21))
    check(bus.readfrom_mem(118, 0xF2, 1) == b"\x01" and bus.readfrom_mem(118, 0xF4, 1) == b"\x25",
          "ctrl_hum x1 and ctrl_meas forced mode written")
    check(bus.readfrom_mem(118, 0xF5, 1) == b"\x00", "config: filter off")
    check(s.read(1) == v and s.chip == 0x60, "second read")
    bme = v

    # the same chip over SoftI2C
    spec2 = dict(spec)
    spec2["i2c"] = "soft"
    check(sensors.build(spec2, 4).read(0) == v, "bme280 over SoftI2C")

    # BMP280 (chip id 0x58): no humidity, ctrl_hum never written
    s = sensors.build({"type": "bme280", "stream": "p", "address": 119}, 5)
    v = s.read(0)
    check(sorted(v) == ["pressure", "temperature"] and s.chip == 0x58, "bmp280 has no humidity: %r" % (v,))
    check(bus.readfrom_mem(119, 0xF2, 1) == b"\x00", "bmp280: ctrl_hum untouched")
    bmp = v

    # missing device: SensorError naming the address; it appears later and the next read works
    s = sensors.build({"type": "bme280", "stream": "gone", "address": 0x75}, 6)
    msg = raises(SensorError, s.read, 0)
    check("sensors[6] (bme280)" in msg and "0x75" in msg and "ENODEV" in msg, "missing device message: " + msg)
    missing = msg
    machine._devices[0x75] = [bytearray(machine._devices[118][0]), 0]
    check(s.read(1) == bme, "device plugged in later is found on the next read")

    # transient bus error (first transaction fails): SensorError, then the next read works
    s = sensors.build({"type": "bme280", "stream": "flaky", "address": 0x70}, 7)
    msg = raises(SensorError, s.read, 0)
    check("EIO" in msg and "0x70" in msg, "transient failure message: " + msg)
    check(s.read(1) == bme, "recovers after a transient bus error")

    # wrong chip id and data registers still at their reset value
    msg = raises(SensorError, sensors.build({"type": "bme280", "stream": "x", "address": 0x71}, 8).read, 0)
    check("chip id 0x61" in msg and "0x71" in msg, "wrong chip message: " + msg)
    msg = raises(SensorError, sensors.build({"type": "bme280", "stream": "x", "address": 0x72}, 9).read, 0)
    check("reset value" in msg, "no measurement message: " + msg)

    # a bus the port does not have is a config error naming the entry
    msg = raises(ValueError, sensors.build, {"type": "bme280", "stream": "x", "i2c": 5}, 10)
    check(msg.startswith("sensors[10] (bme280): ") and "I2C(5)" in msg, "bad bus message: " + msg)

    # DHT22: 3 failures, then the 4th attempt succeeds within one read
    s = sensors.build({"type": "dht22", "stream": "air", "interval": 30, "pin": 4}, 2)
    check(s.read(100) == {"temperature": 21.5, "humidity": 40.1}, "dht22 after 3 retries")
    check(dht.measures[4] == 4, "dht22 measured 4 times: %r" % dht.measures)
    # rate limit: within 2 s the cached reading comes back without touching the sensor
    check(s.read(101.9) == {"temperature": 21.5, "humidity": 40.1} and dht.measures[4] == 4, "dht cached")
    check(s.read(102) == {"temperature": 22.5, "humidity": 41.2} and dht.measures[4] == 5, "dht measured again")
    check(s.read(103) == {"temperature": 22.5, "humidity": 41.2} and dht.measures[4] == 5, "dht cached again")
    check(s.read(99) == {"temperature": 21.5, "humidity": 40.1} and dht.measures[4] == 6, "clock went back: measure")
    # persistent failure: SensorError after 4 attempts, again on the next read
    s = sensors.build({"type": "dht22", "stream": "air2", "pin": 5}, 3)
    msg = raises(SensorError, s.read, 0)
    check("sensors[3] (dht22)" in msg and "pin 5" in msg and "4 attempts" in msg and "ETIMEDOUT" in msg,
          "dht failure message: " + msg)
    check(dht.measures[5] == 4, "4 attempts")
    raises(SensorError, s.read, 0.5)
    check(dht.measures[5] == 8, "a failed read is not rate limited")
    # DHT11: whole numbers
    s = sensors.build({"type": "dht11", "stream": "air3", "pin": 6}, 4)
    v = s.read(0)
    check(v == {"temperature": 23, "humidity": 55} and type(v["temperature"]) is int, "dht11 ints: %r" % (v,))
    # no sensor on the pin at all
    raises(SensorError, sensors.build({"type": "dht22", "stream": "air4", "pin": 13}, 5).read, 0)

    # ADC: microvolts averaged over "samples", scaled, attenuation set
    s = sensors.build({"type": "adc", "stream": "soil", "pin": 34, "field": "moisture", "atten": 11, "scale": 2,
                       "offset": 0.5}, 1)
    check(s._adc.atten() == machine.ADC.ATTN_11DB, "atten 11 dB")
    check(s.read(0) == {"moisture": 3.5}, "4 samples of 1.0/2.0/1.5/1.5 V average 1.5 V -> 3.5")
    s = sensors.build({"type": "adc", "stream": "soil", "pin": 35, "samples": 1, "atten": 2.5}, 1)
    check(s._adc.atten() == machine.ADC.ATTN_2_5DB, "atten 2.5 dB")
    check([s.read(0)["value"] for _ in range(4)] == [0.1234, 0.25, 0.1234, 0.25], "samples 1, values cycle")
    s = sensors.build({"type": "adc", "stream": "soil", "pin": 36, "samples": 3, "scale": -100.0, "offset": 100,
                       "digits": 2}, 1)
    check(s.read(0) == {"value": round(100 - 100 * (1000000 + 2000000 + 2500000) / 3 / 1000000, 2)}, "3 samples")

    # a port whose ADC has no read_uv: read_u16 scaled by vref
    class U16ADC:
        ATTN_11DB = 3

        def __init__(self, pin):
            self.pin = pin

        def read_u16(self):
            return 32768

    real = machine.ADC
    machine.ADC = U16ADC
    try:
        s = sensors.build({"type": "adc", "stream": "soil", "pin": 34, "vref": 3.0, "samples": 2}, 1)
        check(s.read(0) == {"value": round(32768 * 3.0 / 65535, 4)}, "u16 scaling: %r" % (s.read(0),))
    finally:
        machine.ADC = real
    # an invalid pin for this port is a config error naming the entry
    msg = raises(ValueError, sensors.build, {"type": "adc", "stream": "soil", "pin": 60}, 7)
    check(msg.startswith("sensors[7] (adc): ") and "pin" in msg, "invalid pin message: " + msg)
    return {"bme": bme, "bmp": bmp, "missing": missing}


result = {"sim": sim_series(), "bme": bme_cases(), "errors": config_errors()}
if C["hardware"]:
    result["hw"] = hardware()
print("RESULT " + json.dumps(enc(result)))
print("OK checks=%d sim=%d bme=%d errors=%d hardware=%s" % (checks[0], len(result["sim"]), len(result["bme"]),
                                                             len(result["errors"]), C["hardware"]))
