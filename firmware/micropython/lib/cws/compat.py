"""What differs between MicroPython and CPython, in one place (the firmware also runs on CPython).

``ticks_ms``/``ticks_diff`` (wrapping millisecond ticks), ``sleep_ms``/``wait_for_ms`` (asyncio),
``now_ms`` (wall clock, ms since 1970 whatever the port's epoch).
"""

import asyncio
import time

try:
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
except AttributeError:  # CPython
    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

try:
    sleep_ms = asyncio.sleep_ms
    wait_for_ms = asyncio.wait_for_ms
except AttributeError:  # CPython
    def sleep_ms(ms):
        return asyncio.sleep(ms / 1000)

    def wait_for_ms(aw, ms):
        return asyncio.wait_for(aw, ms / 1000)

#: seconds between the port's epoch and 1970 (MicroPython ports before 1.22 count from 2000)
EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0


def now_ms():
    """Wall clock in ms since 1970; small (below 2020) while an ESP32 has not set its clock."""
    if hasattr(time, "time_ns"):
        return time.time_ns() // 1000000 + EPOCH_OFFSET * 1000
    return (int(time.time()) + EPOCH_OFFSET) * 1000


CLOCK_SET_MS = 1577836800000  # 2020-01-01: a clock below this has not been set


def clock_is_set():
    return now_ms() >= CLOCK_SET_MS


def heap():
    """(free, allocated) bytes of the MicroPython heap; (0, 0) on CPython, which has no such figures."""
    import gc

    gc.collect()
    if hasattr(gc, "mem_free"):
        return gc.mem_free(), gc.mem_alloc()
    return 0, 0
