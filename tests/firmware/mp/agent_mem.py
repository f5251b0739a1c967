# Heap footprint of the whole agent, part 1 (run by bench/firmware.py on the wasm/unix ports):
# import every module the agent loads, build it from a config and bundle (shared keys, flash
# buffer, MQTT client, task runner, OTA updater), store a day's worth of telemetry batches in the
# buffer and read them back as the sender would. Part 2 (agent_mem2.py) reads gc.mem_alloc()
# in a later top-level run, after the garbage is reclaimed.
import gc
import os

# binascii, os and time are built into the ESP32's firmware (no heap); the wasm port implements
# them in Python, so they are loaded before the baseline is taken, not charged to the agent
import binascii  # noqa: F401
import json
import time  # noqa: F401

gc.collect()
MEM0 = gc.mem_alloc()

try:
    os.mkdir("fwroot")
except OSError:
    pass
os.chdir("fwroot")
try:
    os.mkdir("cwsnet")
except OSError:
    pass
import fw_agent

with open("cwsnet/config.json", "w") as f:
    f.write(fw_agent.CONFIG)
with open("cwsnet/bundle.json", "w") as f:
    f.write(fw_agent.BUNDLE)
BATCHES = fw_agent.BATCHES
del fw_agent  # the measurement's own data is not the agent's
import sys

del sys.modules["fw_agent"]

from cws import app, nacl

if nacl.urandom is None:  # the wasm port has no RNG: random nonces from random (a measurement, not a device)
    import random

    nacl.urandom = lambda n: bytes(random.getrandbits(8) for _ in range(n))

AGENT, WIFI = app.build()
gc.collect()
MEM_BUILT = gc.mem_alloc()
for i in range(BATCHES):
    for j in range(AGENT.s.max_readings):
        AGENT.add_reading("env", {"temperature": 21.5 + j / 10, "humidity": 40.25})
for seq, topic in AGENT.buf.pending(8, ()):
    AGENT.buf.get(seq)
print("buffered_messages", len(AGENT.buf))
print("buffered_bytes", AGENT.buf.bytes())
