"""Sensors the CPython agent reads. Sans-I/O where possible: the clock is passed in."""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from typing import Any, Protocol

import psutil

from cwsnet.config import SensorConfig


class Sensor(Protocol):
    stream: str
    interval: float

    def read(self, now: float) -> dict[str, Any]: ...


def cpu_temperature() -> float | None:
    """CPU temperature in °C where the platform exposes one (Raspberry Pi, most Linux boards)."""
    try:
        temps = psutil.sensors_temperatures()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        temps = {}
    for name in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "acpitz"):
        for entry in temps.get(name, []):
            if entry.current:
                return round(float(entry.current), 1)
    try:  # Raspberry Pi OS without psutil support
        with open("/sys/class/thermal/thermal_zone0/temp") as f:
            return round(int(f.read().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def system_snapshot(disk_path: str = "/") -> dict[str, Any]:
    """The node's own health: CPU %, memory %, load averages, disk %, temperature."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = [0.0, 0.0, 0.0]
    try:
        usage = shutil.disk_usage(disk_path)
        disk = round(100.0 * usage.used / usage.total, 1) if usage.total else 0.0
    except OSError:
        disk = 0.0
    return {
        "cpu": psutil.cpu_percent(interval=None),
        "mem": psutil.virtual_memory().percent,
        "load": load,
        "disk": disk,
        "temp": cpu_temperature(),
    }


class SystemSensor:
    """Readings of the host itself, as telemetry (the ``system`` sensor)."""

    def __init__(self, cfg: SensorConfig, disk_path: str = "/") -> None:
        self.stream = cfg.stream
        self.interval = cfg.interval
        self._disk_path = disk_path
        psutil.cpu_percent(interval=None)  # prime the CPU counter

    def read(self, now: float) -> dict[str, Any]:
        snap = system_snapshot(self._disk_path)
        values: dict[str, Any] = {
            "cpu": snap["cpu"],
            "mem": snap["mem"],
            "load1": snap["load"][0],
            "disk": snap["disk"],
        }
        if snap["temp"] is not None:
            values["temp"] = snap["temp"]
        return values


class SimulatedSensor:
    """A configurable fake sensor: sine, ramp, square, random walk or constant, per field."""

    def __init__(self, cfg: SensorConfig, start: float | None = None) -> None:
        self.stream = cfg.stream
        self.interval = cfg.interval
        self.cfg = cfg
        self._start = time.time() if start is None else start
        self._rng = random.Random(cfg.seed)
        self._walk = {f: cfg.offset for f in cfg.fields}

    def read(self, now: float) -> dict[str, Any]:
        c = self.cfg
        t = now - self._start
        out: dict[str, Any] = {}
        for i, name in enumerate(c.fields):
            phase = i * math.pi / 3
            if c.pattern == "sine":
                v = c.offset + c.amplitude * math.sin(2 * math.pi * t / c.period + phase)
            elif c.pattern == "ramp":
                v = c.offset + c.amplitude * ((t / c.period) % 1.0)
            elif c.pattern == "square":  # high for the first half of each period, then low
                v = c.offset + c.amplitude if (t / c.period) % 1.0 < 0.5 else c.offset - c.amplitude
            elif c.pattern == "random":
                self._walk[name] += self._rng.uniform(-1, 1) * c.amplitude * 0.05
                self._walk[name] = min(max(self._walk[name], c.offset - c.amplitude), c.offset + c.amplitude)
                v = self._walk[name]
            else:
                v = c.offset
            out[name] = round(v, 3)
        return out


def build_sensor(cfg: SensorConfig) -> Sensor:
    if cfg.type == "system":
        return SystemSensor(cfg)
    return SimulatedSensor(cfg)
