"""Test harness for CWSNet: real processes, a fault-injecting TCP proxy, bounded waits, free ports."""

from .faultproxy import FaultProxy
from .ports import free_port
from .proc import (
    MOSQUITTO_BIN,
    ManagedProcess,
    MosquittoBroker,
    ProcessDied,
    ProcessSet,
    make_password_file,
    start_mosquitto,
)
from .wait import await_for, run_async, wait_for

__all__ = [
    "MOSQUITTO_BIN",
    "FaultProxy",
    "ManagedProcess",
    "MosquittoBroker",
    "ProcessDied",
    "ProcessSet",
    "await_for",
    "free_port",
    "make_password_file",
    "run_async",
    "start_mosquitto",
    "wait_for",
]
