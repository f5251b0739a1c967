# Heap cost of cws.buffer on the WebAssembly port, part 1 of 4 (run.mjs runs the four scripts in
# one interpreter; this port's gc.collect() reclaims garbage only between top-level scripts, so
# each figure is taken at the start of the next script). Part 1: baseline, then the import.
import gc

gc.collect()
MEM = [gc.mem_alloc()]
import cws.buffer
