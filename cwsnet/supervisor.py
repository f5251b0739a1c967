"""``cwsnet up``: run the home-lab daemons as supervised child processes.

Each daemon is a separate process (``python -m cwsnet <daemon> --config ...``) in its own process
group, with its pid in ``{data-dir}/run/{name}.pid`` and its output in ``{data-dir}/logs/{name}.log``.
A daemon that dies is restarted with exponential backoff (1 s doubling to 30 s, reset after it has
run 60 s) and the restart is logged. SIGTERM/SIGINT stops everything tier by tier (devices, gateway, cloud), then
SIGKILLs what is left when the grace period runs out, all within 10 s.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cwsnet.up")

#: a daemon exiting with this code has a bad config or refused credentials (see cwsnet.cli)
FATAL_EXIT = 2


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    pid_path: Path
    ready: Callable[[], bool] | None = None
    tier: int = 0  # shutdown order: higher tiers stop first
    #: when it exits with FATAL_EXIT: stop everything (True), or leave just it stopped (a device
    #: agent refused by its broker, e.g. revoked, must not take the home lab down with it)
    essential: bool = True
    retired: bool = False
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 1.0
    next_start: float = 0.0
    _log_file: object = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - owned by the child's lifetime
        self.proc = subprocess.Popen(
            self.argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        f.close()
        self.started_at = time.monotonic()
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.write_text(f"{self.proc.pid}\n")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class Supervisor:
    def __init__(self, children: list[Child], *, grace: float = 8.0) -> None:
        self.children = children
        self.grace = grace
        # A plain flag, not a threading.Event: stop() runs in a signal handler, and an Event's lock
        # may be held by the very frame the handler interrupted (a deadlock seen in practice).
        self._stopping = False
        self.failed = False

    def stop(self, *_: object) -> None:
        self._stopping = True

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))

    def run(self, on_ready: Callable[[], None] | None = None, ready_timeout: float = 60.0) -> int:
        """Start children in order (each waits for the previous one's readiness), then supervise."""
        for child in self.children:
            if self._stopping:
                break
            child.start()
            log.info("started %s (pid %d); log: %s", child.name, child.proc.pid, child.log_path)  # type: ignore[union-attr]
            if child.ready is not None and not self._wait_ready(child, ready_timeout):
                self.failed = True
                self.shutdown()
                return 1
        if on_ready is not None and not self._stopping:
            on_ready()
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                if child.retired:
                    continue
                if child.proc is not None and not child.alive() and child.proc.returncode == FATAL_EXIT:
                    if not child.essential:
                        log.error("%s exited with code %d (bad configuration or refused credentials, e.g. "
                                  "revoked); not restarted, the rest keeps running; see %s", child.name, FATAL_EXIT,
                                  child.log_path)
                        child.retired = True
                        continue
                    log.error("%s exited with code %d (bad configuration or refused credentials; restarting "
                              "cannot help): stopping everything; see %s", child.name, FATAL_EXIT, child.log_path)
                    self.failed = True
                    self._stopping = True
                    break
                if child.proc is not None and not child.alive():
                    code = child.proc.returncode
                    ran = now - child.started_at
                    if ran > 60:
                        child.backoff = 1.0
                    child.next_start = now + child.backoff
                    log.warning("%s (pid %d) exited with code %s after %.1f s; restarting in %.0f s",
                                child.name, child.proc.pid, code, ran, child.backoff)
                    child.backoff = min(child.backoff * 2, 30.0)
                    child.proc = None
                if child.proc is None and now >= child.next_start:
                    child.restarts += 1
                    child.start()
                    log.warning("restarted %s (pid %d, restart #%d)", child.name, child.proc.pid,  # type: ignore[union-attr]
                                child.restarts)
            self._sleep(0.2)
        self.shutdown()
        return 1 if self.failed else 0

    def _wait_ready(self, child: Child, timeout: float) -> bool:
        """Wait for ``child`` to become ready; False (with the reason logged) if it died or timed out."""
        deadline = time.monotonic() + timeout
        while not self._stopping and not child.ready():  # type: ignore[misc]
            if not child.alive():
                tail = child.log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                log.error("%s exited during start-up with code %s: %s (log: %s)", child.name,
                          child.proc.returncode, tail[0], child.log_path)  # type: ignore[union-attr]
                return False
            if time.monotonic() > deadline:
                log.error("%s not ready after %.0f s; see %s", child.name, timeout, child.log_path)
                return False
            self._sleep(0.1)
        return True

    def shutdown(self) -> int:
        """Stop in reverse start order, tier by tier (devices, then the gateway, then the cloud), so
        each tier's goodbye can still travel up; SIGKILL whatever is left when ``grace`` runs out."""
        log.info("stopping %d daemons", len(self.children))
        tiers: dict[int, list[Child]] = {}
        for child in self.children:
            tiers.setdefault(child.tier, []).append(child)
        final = time.monotonic() + self.grace
        for n, tier in enumerate(sorted(tiers, reverse=True)):
            group = tiers[tier]
            for child in group:
                child.signal(signal.SIGTERM)
            left = len(tiers) - n
            deadline = time.monotonic() + max(0.0, final - time.monotonic()) / left
            while time.monotonic() < deadline and any(c.alive() for c in group):
                time.sleep(0.05)
        for child in self.children:
            if child.alive():
                log.warning("%s did not stop within %.0f s; killing it", child.name, self.grace)
                child.signal(signal.SIGKILL)
                try:
                    child.proc.wait(2)  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    log.error("%s (pid %d) did not die after SIGKILL (stuck in the kernel?)", child.name,
                              child.proc.pid)  # type: ignore[union-attr]
            child.pid_path.unlink(missing_ok=True)
        log.info("all daemons stopped")
        return 0


def daemon_argv(kind: str, config: Path, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "cwsnet", *(extra or []), kind, "--config", str(config)]
