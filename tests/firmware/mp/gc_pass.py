# A top-level run that only collects: this port's gc reclaims garbage between runs, and a pass
# between the work and the measurement leaves fewer stale pointers to keep garbage alive.
import gc

gc.collect()
