import gc

gc.collect()
print("mem_agent_import_and_build", MEM_BUILT - MEM0)
print("mem_agent_running", gc.mem_alloc() - MEM0)
