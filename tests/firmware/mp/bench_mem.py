# Second part of the benchmark: live heap with the modules imported, the key and one payload kept.
import gc

gc.collect()
print("mem_after_seal", gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0)
