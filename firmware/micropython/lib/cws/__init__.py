"""CWSNet firmware for MicroPython: nacl (crypto_box), cbor, envelope (protocol v1)."""
