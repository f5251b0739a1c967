# Part 2 of 4: heap with the module imported; then write a full buffer to the FS (32 segments of
# 10 records, seqs ~1.7e12, i.e. long ints on this 32-bit port) with a throwaway instance.
gc.collect()
MEM.append(gc.mem_alloc())
MEM_T0 = 1767225600000
MEM_TOPIC = "cws/v1/site-1/esp-1/telemetry/env"
_w = cws.buffer.Buffer("/bm/buf", 4096, 32)
for _i in range(320):
    _w.put(MEM_T0 + _i * 10000, 0 if _i % 7 else 1, MEM_TOPIC, bytes(350))
del _w
