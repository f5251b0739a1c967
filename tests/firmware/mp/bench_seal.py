# Firmware sealing benchmark (MicroPython unix/wasm ports, or CPython). Run by bench/firmware.py,
# which writes fw_bench.py (N_SEAL, N_X, the telemetry vector's inputs). Prints "key value" lines.
import gc
import time

try:
    ticks_us, ticks_diff = time.ticks_us, time.ticks_diff
except AttributeError:  # CPython
    def ticks_us():
        return time.perf_counter_ns() // 1000

    def ticks_diff(a, b):
        return a - b

gc.collect()
_m0 = gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0
from cws import envelope, nacl  # noqa: E402

import fw_bench  # noqa: E402

gc.collect()
_m1 = gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0
v = fw_bench.V
t = ticks_us()
for _ in range(fw_bench.N_X):
    k = nacl.box_beforenm(v["recipient_public"], v["sender_secret"])
print("x25519_beforenm_us", ticks_diff(ticks_us(), t) // fw_bench.N_X)
t = ticks_us()
for _ in range(fw_bench.N_SEAL):
    payload = envelope.seal(v["topic"], v["header"], v["body"], k, nonce=v["nonce"])
print("seal_us", ticks_diff(ticks_us(), t) // fw_bench.N_SEAL)
assert payload == v["payload"]
print("payload_bytes", len(payload))
print("mem_before_import", _m0)
print("mem_after_import", _m1)
