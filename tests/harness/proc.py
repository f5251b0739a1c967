"""Real subprocesses for integration tests.

``ManagedProcess`` runs a command in its own process group (``start_new_session=True``)
with stdout and stderr going to a log file, and offers readiness helpers that
fail fast -- with the tail of the log -- if the process dies while we wait.

``ProcessSet`` owns many of them (the ``procs`` fixture) and guarantees they are
all gone at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["ManagedProcess", "ProcessSet", "ProcessDied"]


class ProcessDied(AssertionError):
    """The process exited while a readiness helper was waiting for it."""


class ManagedProcess:
    """One real subprocess with its output in ``log_path``.

    The process is started by the constructor (pass ``start=False`` to defer) and can
    be started again with :meth:`start` / :meth:`restart` after it stopped -- e.g. to
    restart a broker on the same port.  Each start appends a header line to the log
    and readiness helpers only look at output produced since the latest start.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        start: bool = True,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.cwd = os.fspath(cwd) if cwd is not None else None
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="cwsnet-proc-")) / f"{name}.log"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        merged = dict(os.environ)
        merged.setdefault("PYTHONUNBUFFERED", "1")
        for key, value in (env or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        self.env = merged
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.starts = 0
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ManagedProcess:
        """Start the process (it must not be running)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            header = f"=== [{time.strftime('%H:%M:%S')}] start #{self.starts + 1}: {' '.join(self.argv)}\n"
            log.write(header.encode())
            log.flush()
            self._log_offset += len(header.encode())
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def restart(self, timeout: float = 10.0) -> ManagedProcess:
        """Terminate (if running) and start again with the same argv/env/log."""
        self.terminate(timeout=timeout)
        return self.start()

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def _signal_group(self, sig: int) -> None:
        if self._popen is None:
            return
        try:
            os.killpg(self._popen.pid, sig)  # pgid == pid because of start_new_session
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - group leader reaped and pgid reused
            pass

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group without waiting."""
        self._signal_group(sig)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send ``sig`` to the process group.  For SIGKILL also wait (bounded) until reaped."""
        if self._popen is None:
            return None
        self._signal_group(sig)
        if sig == signal.SIGKILL:
            try:
                return self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:  # pragma: no cover - kernel trouble
                raise AssertionError(f"{self.name} (pid {self.pid}) survived SIGKILL for {timeout}s") from exc
        return self._popen.poll()

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to ``timeout`` s, then SIGKILL it.  Returns the exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait(timeout=10.0)
        # stragglers (children that outlived the leader) go too
        self._signal_group(signal.SIGKILL)
        return self._popen.returncode

    # -- logs --------------------------------------------------------------------------------

    def log_text(self, *, since_start: bool = False) -> str:
        """Everything in the log file (or only what the latest start produced)."""
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _died(self, waiting_for: str) -> ProcessDied:
        return ProcessDied(
            f"{self.name} (pid {self.pid}) exited with code {self.returncode} while waiting for "
            f"{waiting_for}; log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def _timed_out(self, waiting_for: str, timeout: float, detail: str = "") -> AssertionError:
        extra = f" ({detail})" if detail else ""
        return AssertionError(
            f"{self.name} (pid {self.pid}) not ready after {timeout:.1f}s waiting for {waiting_for}{extra}; "
            f"log tail ({self.log_path}):\n{self.log_tail()}"
        )

    # -- readiness ---------------------------------------------------------------------------

    def wait_port(self, host: str, port: int, timeout: float = 10.0, interval: float = 0.05) -> None:
        """Wait until a TCP connect to ``host:port`` succeeds."""
        what = f"TCP {host}:{port}"
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if not self.alive:
                raise self._died(what)
            try:
                with socket.create_connection((host, port), timeout=min(1.0, timeout)):
                    return
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise self._timed_out(what, timeout, last)
            time.sleep(interval)

    def wait_http(
        self, url: str, timeout: float = 10.0, status: int | None = None, interval: float = 0.1
    ) -> int:
        """Wait until ``url`` answers over HTTP (with ``status`` if given).  Returns the status."""
        what = f"HTTP {url}" + (f" status {status}" if status is not None else "")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via env proxies
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if not self.alive:
                raise self._died(what)
            code: int | None = None
            try:
                with opener.open(url, timeout=min(2.0, timeout)) as resp:
                    code = resp.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except (OSError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if code is not None:
                if status is None or code == status:
                    return code
                last = f"status {code}"
            if time.monotonic() >= deadline:
                raise self._timed_out(what, timeout, last)
            time.sleep(interval)

    def wait_log(
        self, regex: str | re.Pattern[str], timeout: float = 10.0, interval: float = 0.05,
        *, since_start: bool = True,
    ) -> re.Match[str]:
        """Wait until the log (by default: since the latest start) matches ``regex``."""
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        what = f"log line /{pattern.pattern}/"
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.log_text(since_start=since_start))
            if match:
                return match
            if not self.alive:
                # one last look: the line may have been written just before exiting
                match = pattern.search(self.log_text(since_start=since_start))
                if match:
                    return match
                raise self._died(what)
            if time.monotonic() >= deadline:
                raise self._timed_out(what, timeout)
            time.sleep(interval)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.returncode}"
        pid = self._popen.pid if self._popen else None
        return f"<ManagedProcess {self.name} pid={pid} {state}>"


class ProcessSet:
    """Owner of every process a test starts; :meth:`close` kills them all."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[ManagedProcess] = []

    def start(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ManagedProcess:
        """Start a process whose log goes to ``<log_dir>/<name>.log`` (name made unique)."""
        taken = {p.name for p in self._procs}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        proc = ManagedProcess(unique, argv, env=env, cwd=cwd, log_path=self.log_dir / f"{unique}.log")
        self._procs.append(proc)
        return proc

    def __iter__(self) -> Iterator[ManagedProcess]:
        return iter(list(self._procs))

    def __len__(self) -> int:
        return len(self._procs)

    def __getitem__(self, name: str) -> ManagedProcess:
        for p in self._procs:
            if p.name == name:
                return p
        raise KeyError(name)

    def tails(self, lines: int = 40) -> str:
        """Log tails of every process, for failure reports."""
        parts = []
        for p in self._procs:
            parts.append(f"----- {p.name} ({p!r}) log tail: {p.log_path} -----\n{p.log_tail(lines)}")
        return "\n".join(parts)

    def close(self, timeout: float = 5.0) -> None:
        """Terminate (SIGTERM, then SIGKILL after ``timeout``) every process, newest first."""
        errors: list[BaseException] = []
        for p in reversed(self._procs):
            try:
                p.terminate(timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - keep killing the rest
                errors.append(exc)
        if errors:
            raise errors[0]


# -- mosquitto -------------------------------------------------------------------------------

MOSQUITTO_BIN = os.environ.get("CWSNET_MOSQUITTO", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD_BIN = os.environ.get("CWSNET_MOSQUITTO_PASSWD", "/usr/bin/mosquitto_passwd")


class MosquittoBroker:
    """A real Debian ``mosquitto`` on loopback, owned by a :class:`ProcessSet`.

    Attributes: ``host``, ``port``, ``proc`` (the :class:`ManagedProcess`), ``conf_path``.
    ``restart()`` brings it back on the same port (e.g. after ``kill()``).
    """

    def __init__(self, proc: ManagedProcess, host: str, port: int, conf_path: Path) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.conf_path = conf_path

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def wait_ready(self, timeout: float = 10.0) -> MosquittoBroker:
        self.proc.wait_port(self.host, self.port, timeout=timeout)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the broker (default SIGKILL: no goodbye to clients, no will cleanup)."""
        self.proc.kill(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.proc.terminate(timeout=timeout)

    def restart(self, timeout: float = 10.0) -> MosquittoBroker:
        """(Re)start on the same port and wait until it accepts connections."""
        if self.proc.alive:
            self.proc.terminate(timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:  # the port can linger for a moment after a kill; retry the start
            self.proc.start()
            try:
                return self.wait_ready(timeout=max(0.5, deadline - time.monotonic()))
            except ProcessDied:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def __repr__(self) -> str:
        return f"<MosquittoBroker {self.host}:{self.port} {self.proc!r}>"


def make_password_file(path: str | os.PathLike[str], users: Mapping[str, str]) -> Path:
    """Create a mosquitto password file with ``mosquitto_passwd -b [-c]``."""
    path = Path(path)
    first = True
    for user, password in users.items():
        argv = [MOSQUITTO_PASSWD_BIN, "-b"] + (["-c"] if first else []) + [str(path), user, password]
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
        first = False
    return path


def start_mosquitto(
    procs: ProcessSet,
    workdir: str | os.PathLike[str],
    port: int,
    *,
    host: str = "127.0.0.1",
    name: str = "mosquitto",
    allow_anonymous: bool = True,
    password_file: str | os.PathLike[str] | None = None,
    extra_conf: str = "",
    timeout: float = 10.0,
) -> MosquittoBroker:
    """Write a config into ``workdir`` and start mosquitto on ``host:port``; wait until it listens."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"listener {port} {host}",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "persistence false",
        "log_dest stderr",  # unbuffered (stdout to a file is block-buffered: lines would show up late)
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %H:%M:%S",
    ]
    if password_file is not None:
        lines.append(f"password_file {os.fspath(password_file)}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # as root mosquitto drops to user "mosquitto", which cannot read pytest's 0700 tmp dirs
        lines.append("user root")
    if extra_conf:
        lines.append(extra_conf)
    conf_path = workdir / f"{name}-{port}.conf"
    conf_path.write_text("\n".join(lines) + "\n")
    proc = procs.start(name, [MOSQUITTO_BIN, "-c", str(conf_path)])
    return MosquittoBroker(proc, host, port, conf_path).wait_ready(timeout)
