# Part 3 of 4: heap before a fresh Buffer scans the full directory and builds its RAM index.
gc.collect()
MEM.append(gc.mem_alloc())
B = cws.buffer.Buffer("/bm/buf", 4096, 32)
