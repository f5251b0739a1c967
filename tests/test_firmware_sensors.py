"""The firmware's sensor drivers (firmware/micropython/lib/cws/sensor*.py) on real interpreters.

``tests/firmware/mp/sensor_checks.py`` runs unchanged on MicroPython's unix port and CPython,
both on the fake ESP32 hardware of ``tests/firmware/board`` (I2C register files, DHT and ADC
values from a CWS_FAKE_HW JSON written here), and on the 32-bit WebAssembly port for the parts
that need no hardware (simulated sensors, BME280 compensation from raw registers, config
errors). CPython judges what the script prints: the simulated series against the CPython
agent's SimulatedSensor, the BME280's integer compensation against the Bosch datasheet's
double-precision formulas, and every port's numbers bit for bit against the others.
"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "firmware"))
import fakehw  # noqa: E402
import mpdata  # noqa: E402
from mprun import run_wasm  # noqa: E402

from cwsnet.config import SensorConfig  # noqa: E402
from edge_agent.sensors import SimulatedSensor  # noqa: E402

SCRIPT = mpdata.MP_SCRIPTS / "sensor_checks.py"
PORTS = ["unix", "cpython", "wasm"]

# ---- BME280: calibration sets and raw readings ----------------------------------------------------

#: (T1, T2, T3, P1..P9, H1..H6): the BMP280 datasheet's worked example (§3.12, T and P) with a
#: real BME280's humidity trimming, and a second set read from another real part
CALS = [
    (27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000, 75, 362, 0, 313, 50, 30),
    (28155, 26962, 50, 37389, -10497, 3024, 9736, -150, -7, 9900, -10230, 4285, 75, 378, 0, 281, 50, 30),
]
#: (adc_T, adc_P, adc_H): the datasheet example, then readings from cold and dry to hot and humid
RAWS = [(519888, 415148, 30000), (435000, 400000, 22000), (470000, 390000, 26000), (501234, 380000, 31000),
        (540000, 370000, 34000), (560000, 362000, 40000), (580123, 410000, 18000), (498765, 420000, 33333),
        (450000, 405000, 28000)]  # includes humidity clamped at 100 % and at 0 %


def bme280_reference(cal: tuple[int, ...], adc_t: int, adc_p: int, adc_h: int) -> tuple[float, float, float]:
    """The datasheet's BME280_compensate_T_double, _P_double and _H_double: (°C, Pa, %RH)."""
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6 = cal
    var1 = (adc_t / 16384.0 - t1 / 1024.0) * t2
    var2 = ((adc_t / 131072.0 - t1 / 8192.0) * (adc_t / 131072.0 - t1 / 8192.0)) * t3
    t_fine = int(var1 + var2)
    temperature = (var1 + var2) / 5120.0
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * p6 / 32768.0
    var2 = var2 + var1 * p5 * 2.0
    var2 = var2 / 4.0 + p4 * 65536.0
    var1 = (p3 * var1 * var1 / 524288.0 + p2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * p1
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = p9 * p * p / 2147483648.0
    var2 = p * p8 / 32768.0
    pressure = p + (var1 + var2 + p7) / 16.0
    h = t_fine - 76800.0
    h = (adc_h - (h4 * 64.0 + h5 / 16384.0 * h)) * (h2 / 65536.0 * (1.0 + h6 / 67108864.0 * h
                                                                   * (1.0 + h3 / 67108864.0 * h)))
    h = h * (1.0 - h1 * h / 524288.0)
    return temperature, pressure, min(max(h, 0.0), 100.0)


def bme_cases() -> list[list[str]]:
    out = []
    for cal in CALS:
        a, b = fakehw.bme280_calibration_bytes(cal)
        for adc_t, adc_p, adc_h in RAWS:
            out.append([a.hex(), b.hex(), fakehw.bme280_data_bytes(adc_t, adc_p, adc_h).hex()])
    a, _ = fakehw.bme280_calibration_bytes(CALS[0])  # a BMP280: no humidity registers
    out.append([a.hex(), "", fakehw.bme280_data_bytes(*RAWS[0][:2], None)[:6].hex()])
    return out


# ---- simulated sensors: the same configs through the CPython agent --------------------------------

SIM = [
    {"type": "simulated", "stream": "env", "interval": 10, "fields": ["temperature", "humidity"], "pattern": "sine",
     "offset": 20, "amplitude": 5, "period": 120, "seed": 1},
    {"type": "simulated", "stream": "ramp", "fields": ["a", "b", "c"], "pattern": "ramp", "offset": -3.5,
     "amplitude": 12.25, "period": 7.5},
    {"type": "simulated", "stream": "flat", "pattern": "constant", "offset": 17.125},
    {"type": "simulated", "stream": "walk0", "fields": ["x"], "pattern": "random", "seed": 0},
    {"type": "simulated", "stream": "walk-big", "fields": ["x", "y"], "pattern": "random", "offset": 1000,
     "amplitude": 0.5, "seed": 2**40 + 3},
    {"type": "simulated", "stream": "walk", "fields": ["t", "h", "p"], "pattern": "random", "offset": 10,
     "amplitude": 4, "period": 30, "seed": 42},
    {"type": "simulated", "stream": "hot", "fields": ["temp_c"], "pattern": "square", "offset": 27, "amplitude": 6,
     "period": 3.5},
]
SIM_TIMES = [0, 1, 2.5, 7.5, 10, 59.75, 60, 119, 120, 333.25, 1000, 86400.5] + [k * 7.25 for k in range(150)]


def cpython_series(spec: dict[str, Any]) -> list[dict[str, Any]]:
    s = SimulatedSensor(SensorConfig(**spec), start=0.0)
    return [s.read(t) for t in SIM_TIMES]


# ---- config errors: (spec, index, the key the message must name) ----------------------------------

BAD = [
    ({"type": "bme280", "stream": "climate", "address": "x"}, 2, "address"),
    ({"type": "bme280", "stream": "climate", "address": 128}, 0, "address"),
    ({"type": "bme280", "stream": "climate", "i2c": "hard"}, 1, "i2c"),
    ({"type": "bme280", "stream": "climate", "scl": True}, 3, "scl"),
    ({"type": "bme280", "stream": "climate", "freq": 5}, 4, "freq"),
    ({"type": "bmp280", "stream": "climate", "sda": 2.0}, 5, "sda"),
    ({"type": "adc", "stream": "soil"}, 6, "pin"),
    ({"type": "adc", "stream": "soil", "pin": 34, "atten": 3}, 7, "atten"),
    ({"type": "adc", "stream": "soil", "pin": 34, "samples": 0}, 8, "samples"),
    ({"type": "adc", "stream": "soil", "pin": 34, "scale": "2"}, 9, "scale"),
    ({"type": "adc", "stream": "soil", "pin": 34, "field": "a/b"}, 10, "field"),
    ({"type": "adc", "stream": "soil", "pin": 34, "vref": 0}, 11, "vref"),
    ({"type": "adc", "stream": "soil", "pin": 34, "adress": 1}, 12, "adress"),
    ({"type": "dht22", "stream": "air", "pin": -1}, 13, "pin"),
    ({"type": "dht11", "stream": "air"}, 14, "pin"),
    ({"type": "simulated", "stream": "env", "pattern": "triangle"}, 15, "pattern"),
    ({"type": "simulated", "stream": "env", "period": 0}, 16, "period"),
    ({"type": "simulated", "stream": "env", "fields": []}, 17, "fields"),
    ({"type": "simulated", "stream": "env", "fields": ["x", "x"]}, 18, "fields"),
    ({"type": "simulated", "stream": "env", "seed": 1.5}, 19, "seed"),
    ({"type": "simulated", "stream": "env", "amplitude": None}, 20, "amplitude"),
    ({"type": "simulated", "stream": "bad/name"}, 21, "stream"),
    ({"type": "simulated"}, 22, "stream"),
    ({"type": "simulated", "stream": "env", "interval": 0}, 23, "interval"),
    ({"type": "simulated", "stream": "env", "interval": 100000}, 24, "interval"),
    ({"type": "simulated", "stream": "env", "intervl": 5}, 25, "intervl"),
    ({"type": "sonar", "stream": "env"}, 26, "type"),
    ({"stream": "env"}, 27, "type"),
    ("bme280", 28, None),
]


# ---- the fake hardware ----------------------------------------------------------------------------

def fake_hw() -> dict[str, Any]:
    cal = CALS[0]
    bme = fakehw.bme280_device(cal, *RAWS[1])
    reset_value = fakehw.bme280_device(cal, 0x80000, 0x80000, 0x8000)
    return {
        "i2c": {
            "118": bme,
            "119": fakehw.bme280_device(cal, *RAWS[1][:2], None, chip_id=fakehw.BMP280_CHIP_ID),
            "112": dict(bme, fail=1),
            "113": fakehw.bme280_device(cal, *RAWS[1], chip_id=0x61),
            "114": reset_value,
        },
        "dht": {"4": {"temperature": [21.5, 22.5], "humidity": [40.1, 41.2], "fail": 3},
                "5": {"temperature": 20.0, "humidity": 50.0, "fail": 1000},
                "6": {"temperature": 23.0, "humidity": 55.0}},
        "adc": {"34": [1000000, 2000000, 1500000, 1500000], "35": [123400, 250000],
                "36": [1000000, 2000000, 2500000]},
    }


def case_data(hardware: bool) -> str:
    data = {"hardware": hardware, "sim": SIM, "sim_times": SIM_TIMES, "bme": bme_cases(),
            "bad": [[spec, index] for spec, index, _ in BAD], "hw": fake_hw()}
    return mpdata.module(DATA=json.dumps(data))


def decode(v: Any) -> Any:
    if isinstance(v, str) and v.startswith("f:"):
        return struct.unpack(">d", bytes.fromhex(v[2:]))[0]
    if isinstance(v, dict):
        return {k: decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [decode(x) for x in v]
    return v


_RESULTS: dict[str, tuple[dict[str, Any], str]] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sensors")


def results(port: str, workdir: Path) -> dict[str, Any]:
    """Run the checks on ``port`` once per session; the decoded RESULT line."""
    if port not in _RESULTS:
        data = workdir / port
        data.mkdir(exist_ok=True)
        (data / "fw_sensor_cases.py").write_text(case_data(hardware=port != "wasm"))
        if port == "wasm":
            out = run_wasm(SCRIPT, data)
        else:
            out = fakehw.run_board(SCRIPT, fake_hw(), data, data, port=port, heap="2m").stdout
        lines = out.strip().splitlines()
        assert lines and lines[-1].startswith("OK "), out
        res = [ln for ln in lines if ln.startswith("RESULT ")]
        assert len(res) == 1, out
        _RESULTS[port] = (decode(json.loads(res[0][len("RESULT "):])), lines[-1])
    return _RESULTS[port][0]


@pytest.mark.parametrize("port", PORTS)
def test_sensor_checks_pass(port: str, workdir: Path) -> None:
    results(port, workdir)
    print(port, _RESULTS[port][1])
    assert ("hardware=True" in _RESULTS[port][1]) == (port != "wasm")


@pytest.mark.parametrize("port", PORTS)
def test_simulated_matches_the_cpython_agent(port: str, workdir: Path) -> None:
    got = results(port, workdir)["sim"]
    assert len(got) == len(SIM)
    for spec, series in zip(SIM, got, strict=True):
        want = cpython_series(spec)
        assert len(series) == len(want)
        for t, g, w in zip(SIM_TIMES, series, want, strict=True):
            assert g == w, f"{spec['stream']} at t={t}: firmware {g}, CPython agent {w}"
            assert all(type(x) is float for x in g.values()), g


def test_simulated_random_walk_stays_in_bounds_and_moves(workdir: Path) -> None:
    series = results("unix", workdir)["sim"][5]
    xs = [r["t"] for r in series]
    assert all(6.0 <= x <= 14.0 for x in xs) and len(set(xs)) > 50


@pytest.mark.parametrize("port", PORTS)
def test_bme280_compensation_against_the_datasheet(port: str, workdir: Path) -> None:
    got = results(port, workdir)["bme"]
    cases = [(cal, raw) for cal in CALS for raw in RAWS]
    assert len(got) == len(cases) + 1
    for (cal, raw), (g_cal, g_raw, ints, values) in zip(cases, got, strict=False):
        assert tuple(g_cal) == cal and tuple(g_raw) == raw, "calibration/raw registers parsed wrongly"
        t, p, h = ints
        rt, rp, rh = bme280_reference(cal, *raw)
        assert abs(t / 100 - rt) <= 0.01, (raw, t, rt)
        assert abs(p / 256 - rp) <= 1.0, (raw, p / 256, rp)
        assert abs(h / 1024 - rh) <= 0.1, (raw, h / 1024, rh)
        assert values == {"temperature": t / 100, "pressure": ((p + 128) // 256) / 100,
                          "humidity": ((h * 100 + 512) // 1024) / 100}, values
        assert 90 > values["temperature"] > -40 and 700 < values["pressure"] < 1150, values
    # the datasheet's worked example: 25.08 °C (t_fine 128422)
    assert got[0][2][0] == 2508
    bmp = got[-1]
    assert bmp[2][2] is None and sorted(bmp[3]) == ["pressure", "temperature"]
    assert bmp[3]["temperature"] == got[0][3]["temperature"] and bmp[3]["pressure"] == got[0][3]["pressure"]


def test_bme280_readings_cover_a_realistic_range(workdir: Path) -> None:
    temps = [v["temperature"] for _, _, _, v in results("cpython", workdir)["bme"][:-1]]
    hums = [v["humidity"] for _, _, _, v in results("cpython", workdir)["bme"][:-1]]
    assert min(temps) < 0 < 30 < max(temps), temps
    assert min(hums) < 30 and max(hums) > 70, hums


def test_every_port_computes_the_same_bits(workdir: Path) -> None:
    base = results("cpython", workdir)
    for port in ("unix", "wasm"):
        other = results(port, workdir)
        for key in ("sim", "bme", "errors"):
            assert other[key] == base[key], f"{port} differs from CPython in {key}"
    assert results("unix", workdir)["hw"] == base["hw"]


@pytest.mark.parametrize("port", PORTS)
def test_config_errors_name_the_index_and_the_field(port: str, workdir: Path) -> None:
    msgs = results(port, workdir)["errors"]
    assert len(msgs) == len(BAD) + 1
    assert msgs[0] == "sensors[2] (bme280): 'address' must be an int 0..127, got 'x'"
    for (spec, index, key), msg in zip(BAD, msgs, strict=False):
        assert msg.startswith(f"sensors[{index}]"), msg
        if key is not None:
            assert f"'{key}'" in msg, msg
        if isinstance(spec, dict) and spec.get("type") in ("bme280", "bmp280", "adc", "dht22", "dht11",
                                                             "simulated"):
            assert msg.startswith(f"sensors[{index}] ({spec['type']}): "), msg
    assert msgs[-1].startswith("sensors: must be a list"), msgs[-1]


@pytest.mark.parametrize("port", ["unix", "cpython"])
def test_hardware_drivers_on_the_fakes(port: str, workdir: Path) -> None:
    hw = results(port, workdir)["hw"]
    cal, raw = CALS[0], RAWS[1]
    rt, rp, rh = bme280_reference(cal, *raw)
    assert hw["bme"]["temperature"] == pytest.approx(rt, abs=0.011)
    assert hw["bme"]["pressure"] == pytest.approx(rp / 100, abs=0.011)
    assert hw["bme"]["humidity"] == pytest.approx(rh, abs=0.1)
    assert sorted(hw["bmp"]) == ["pressure", "temperature"]
    assert hw["bmp"]["temperature"] == hw["bme"]["temperature"]
    assert "0x75" in hw["missing"] and hw["missing"].startswith("sensors[6] (bme280): "), hw["missing"]


def test_fake_wifi_machine_and_reset(tmp_path: Path) -> None:
    """The fakes' documented defaults and WiFi behaviour, on CPython (the agent's tests use them too)."""
    down = tmp_path / "down"
    script = tmp_path / "probe.py"
    script.write_text(
        "import machine, network, dht\n"
        "w = network.WLAN(network.STA_IF)\n"
        "assert w is network.WLAN(network.STA_IF)\n"
        "w.active(True)\n"
        "seen = []\n"
        "for ssid, pw in (('lab', 'pw'), ('lab', 'nope'), ('other', 'pw'), ('lab', 'pw'), ('lab', 'pw')):\n"
        "    w.connect(ssid, pw)\n"
        "    while w.status() == network.STAT_CONNECTING:\n"
        "        pass\n"
        "    seen.append(w.status())\n"
        "print('SEEN', seen, w.isconnected(), w.status('rssi'), w.config('mac').hex())\n"
        f"open({str(down)!r}, 'w').close()\n"
        "print('DOWN', w.isconnected(), w.status())\n"
        "import os\n"
        f"os.remove({str(down)!r})\n"
        "print('UP', w.isconnected())\n"
        "print('MACHINE', machine.reset_cause(), machine.unique_id().hex(), machine.freq())\n"
        "wdt = machine.WDT(timeout=1000); wdt.feed(); wdt.feed(); print('WDT', machine.WDT.feeds)\n"
        "print('RTC', machine.RTC().datetime()[0] > 2020)\n"
        "machine.RTC().datetime((2030, 1, 2, 2, 3, 4, 5, 0)); print('RTC2', machine.RTC().datetime()[:3])\n"
        "machine.reset()\n")
    hw = {"wifi": {"ssid": "lab", "password": "pw", "fail_connects": 1, "rssi": -70}, "wifi_down_file": str(down),
          "reset_cause": 3, "unique_id": "0a0b0c0d0e0f"}
    for port in ("cpython", "unix"):
        run = fakehw.run_board(script, hw, tmp_path / port, port=port, max_resets=1, check=False)
        assert run.returncode == fakehw.RESET_EXIT and run.resets == 1, run.stdout + run.stderr
        first = run.outputs[0]
        stat = "[205, 202, 201, 1010, 1010]"  # CONNECT_FAIL, WRONG_PASSWORD, NO_AP_FOUND, GOT_IP, GOT_IP
        assert f"SEEN {stat} True -70 246f28a1b2c4" in first, first
        assert "DOWN False 1001" in first and "UP True" in first, first
        assert "MACHINE 3 0a0b0c0d0e0f 240000000" in first and "WDT 2" in first, first
        assert "RTC True" in first and "RTC2 (2030, 1, 2)" in first, first
        assert run.outputs[1] == first  # a reset boots the same script again, counters from zero


def test_fake_dht_and_i2c_defaults_without_a_config(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(
        "import machine, dht\n"
        "i2c = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21), freq=400000)\n"
        "print('SCAN', i2c.scan())\n"
        "try:\n"
        "    i2c.readfrom_mem(0x76, 0xD0, 1)\n"
        "except OSError as e:\n"
        "    print('ERR', e.args[0])\n"
        "d = dht.DHT22(machine.Pin(4))\n"
        "try:\n"
        "    d.measure()\n"
        "except OSError as e:\n"
        "    print('DHT', e.args[0])\n"
        "print('ADC', machine.ADC(machine.Pin(34)).read_uv())\n")
    for port in ("cpython", "unix"):
        out = fakehw.run_board(script, None, tmp_path / port, port=port).stdout
        assert "SCAN []" in out and "ERR 19" in out and "DHT 110" in out and "ADC 0" in out, out


def test_fake_register_file_round_trip() -> None:
    sys.path.insert(0, str(mpdata.FIRMWARE_LIB))
    try:
        from cws import sensor_bme280 as sensors
    finally:
        sys.path.remove(str(mpdata.FIRMWARE_LIB))
    rng = random.Random(5)
    for _ in range(20):
        cal = (rng.randrange(1, 65536), *(rng.randrange(-32768, 32768) for _ in range(2)), rng.randrange(1, 65536),
               *(rng.randrange(-32768, 32768) for _ in range(8)), rng.randrange(256), rng.randrange(-32768, 32768),
               rng.randrange(256), rng.randrange(-2048, 2048), rng.randrange(-2048, 2048), rng.randrange(-128, 128))
        regs = fakehw.bme280_registers(cal, 500000, 300000, 30000)
        assert len(regs) == 256 and regs[0xD0] == 0x60
        assert sensors.bme280_calibration(regs[0x88:0x88 + 26], regs[0xE1:0xE8]) == cal
        assert sensors.bme280_raw(regs[0xF7:0xFF]) == (500000, 300000, 30000)
