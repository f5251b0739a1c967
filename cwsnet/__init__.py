"""CWSNet: an MQTT-centric IoT edge platform. The shared core: wire protocol, identities, config, CLI."""

__version__ = "0.1.0"
