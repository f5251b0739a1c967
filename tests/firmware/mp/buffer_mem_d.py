# Part 4 of 4: heap with the index built (the Buffer object, its index, its read buffer).
gc.collect()
MEM.append(gc.mem_alloc())
assert len(B) == 320 and B.segments() == 32, (len(B), B.segments())
assert B.pending(3)[0][0] == MEM_T0
print("MEM import=%d index=%d segments=%d records=%d bytes=%d" % (
    MEM[1] - MEM[0], MEM[3] - MEM[2], B.segments(), len(B), B.bytes()))
