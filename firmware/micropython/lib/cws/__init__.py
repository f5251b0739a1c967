"""CWSNet firmware for MicroPython: the ESP32 agent (app, agent, mqtt, buffer, sensors, tasks, ota)
on the protocol core (nacl: crypto_box, cbor, envelope: protocol v1)."""

__version__ = "0.1.0"
