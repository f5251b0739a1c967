"""systemd's service notification protocol (``sd_notify(3)``), spoken directly, no dependency.

Under a unit with ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). A daemon
sends newline-separated ``KEY=VALUE`` assignments in one datagram: ``READY=1`` once it runs,
``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` (we ping at
half of it, as systemd recommends), ``STOPPING=1`` when it begins to shut down.

Without ``NOTIFY_SOCKET`` (not under systemd) every call is a no-op. Sending never raises: a socket
that went away (systemd restarted, a test that closed its end) is logged once and ignored, so the
daemon never dies of its supervisor's notification channel.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("cwsnet.sdnotify")


def _address(value: str) -> str | None:
    """The ``AF_UNIX`` address ``NOTIFY_SOCKET`` names: a path, or ``@name`` for an abstract socket."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # (systemd also allows vsock: addresses; we do not run inside VMs that use them)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None when systemd
    asks for no watchdog (unset, 0, malformed, or ``WATCHDOG_PID`` names another process)."""
    env = os.environ if env is None else env
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notifications to systemd; every method is a harmless no-op when not under systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket path or @abstract name; not notifying systemd", raw)
        self.watchdog = watchdog_interval(env) if self.address else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._status: str | None = None
        self.stopping_sent = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never stall the event loop on a full receive queue
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:  # once: a gone socket stays gone, and every ping would log again
                log.warning("cannot notify systemd at %s: %s (continuing without)",
                            self.address.replace("\0", "@"), exc)
            self._failed = True
            return False
        if self._failed:
            log.info("notifying systemd again")
            self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is not None:
            self._status = status
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=text``, sent only when it changed."""
        if text == self._status:
            return False
        self._status = text
        return self.notify(f"STATUS={text}")

    def ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        """``STOPPING=1`` (once)."""
        if self.stopping_sent:
            return False
        self.stopping_sent = True
        self._status = status
        return self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
