# cws.buffer in a small heap (MicroPython unix port, run with -X heapsize=64k: a 64-bit build,
# so objects are about twice their ESP32 size). Fills a full buffer (32 segments of 10 records,
# seqs ~1.7e12), restarts on it, then runs a long store-and-forward loop (put, pending, get,
# gapped acks, drops at the bound) and checks the live heap does not grow. Needs fw_bufenv.ROOT.
# Prints "OK ..." with the heap figures.
import gc
import os

from cws.buffer import Buffer, SeqMark

import fw_bufenv

T0 = 1767225600000
TOPIC = "cws/v1/site-1/esp-1/telemetry/env"


def rmtree(p):
    try:
        mode = os.stat(p)[0]
    except OSError:
        return
    if mode & 0o170000 == 0o040000:
        for n in os.listdir(p):
            rmtree(p + "/" + n)
        os.rmdir(p)
    else:
        os.remove(p)


def live():
    gc.collect()
    return gc.mem_alloc()


ROOT = fw_bufenv.ROOT + "/heap"
rmtree(ROOT)
PAYLOAD = bytes(350)
base = live()
w = Buffer(ROOT + "/buf", 4096, 32)
for i in range(320):
    w.put(T0 + i * 10000, 0 if i % 7 else 1, TOPIC, PAYLOAD)
del w
before = live()
b = Buffer(ROOT + "/buf", 4096, 32)
m = SeqMark(ROOT + "/state/seq", 1000)
index = live() - before
assert len(b) == 320 and b.segments() == 32, (len(b), b.segments())
seq = 0
start = 0
for cycle in range(900):
    if cycle == 300:  # at the bound by now: the steady state starts
        start = live()
    seq = m.next(T0 + 10 ** 7)
    b.put(seq, 1 if cycle % 9 == 0 else 0, TOPIC, PAYLOAD)
    batch = b.pending(8)
    for s, t in batch:
        got = b.get(s)
        assert got is not None and got[0] == t and len(got[1]) == len(PAYLOAD), s
    if cycle % 4 == 0 and len(batch) > 4:
        b.ack(batch[0][0], batch[0][0])  # gapped: batch[1] stays
        b.ack(batch[2][0], batch[3][0])
end = live()
assert b.segments() == 32 and 300 <= len(b) <= 330, (b.segments(), len(b))
dropped = b.dropped["telemetry"] + b.dropped["event"]
print("OK index=%d growth=%d dropped=%d pending=%d segments=%d heap_used=%d" % (
    index, end - start, dropped, len(b), b.segments(), end - base))
assert end - start < 2048, "live heap grew by %d bytes" % (end - start)
