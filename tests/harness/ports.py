"""Free loopback TCP ports for tests.

``free_port()`` asks the kernel for an ephemeral port (bind to ``127.0.0.1:0``),
closes the socket and returns the number.  A process-wide set remembers every
port handed out so the same number is never given twice in one test session,
even if the kernel would offer it again after the socket closed (which it
often does).  There is still the usual tiny race with *other* programs grabbing
the port between ``free_port()`` and the real bind; tests on loopback accept it.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["free_port", "release_port"]

_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1", *, attempts: int = 200) -> int:
    """Return a TCP port on ``host`` that is free now and not yet handed out this session."""
    with _lock:
        for _ in range(attempts):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"could not find a fresh free port on {host} after {attempts} attempts")


def release_port(port: int) -> None:
    """Allow ``port`` to be handed out again (rarely needed)."""
    with _lock:
        _handed_out.discard(port)
