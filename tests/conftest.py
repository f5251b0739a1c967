"""Shared fixtures: free ports, real processes, a real mosquitto, fault proxies, data dirs.

Import the harness in test modules with ``from harness import ...`` (``tests/`` is on
``sys.path`` under pytest's default rootdir-based import mode).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# ``tests/`` on sys.path whatever --import-mode is used, so ``import harness`` always works
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from harness import FaultProxy, MosquittoBroker, ProcessSet, start_mosquitto  # noqa: E402
from harness import free_port as _free_port  # noqa: E402
from harness.proc import MOSQUITTO_BIN  # noqa: E402

# Reports of each phase ("setup", "call", "teardown") stored on the item, as in the pytest docs
# ("Making test result information available in fixtures").
phase_report_key = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    item.stash.setdefault(phase_report_key, {})[rep.when] = rep
    return rep


def _test_failed(node: pytest.Item) -> bool:
    reports = node.stash.get(phase_report_key, {})
    return any(r.failed for r in reports.values())


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cwsnet chaos")
    group.addoption("--chaos-minutes", type=float, default=float(os.environ.get("CWSNET_CHAOS_MINUTES") or 2),
                    help="minutes of chaos in tests/test_chaos.py (default: a bounded 30 s run, 2 with CWSNET_SOAK=1; or "
                         "$CWSNET_CHAOS_MINUTES)")
    group.addoption("--chaos-seed", type=int, default=None,
                    help="seed of the chaos schedule (default: $CWSNET_CHAOS_SEED or a random one, printed)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # a chaos test runs for --chaos-minutes, plus start-up, drain and audit (about 2 more minutes)
    limit = config.getoption("--chaos-minutes") * 60 + 240
    for item in items:
        if item.get_closest_marker("chaos") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))


@pytest.fixture
def free_port() -> int:
    """A free loopback TCP port, never handed out before in this session."""
    return _free_port()


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    """Start real processes with ``procs.start(name, argv, env=..., cwd=...)``.

    Everything is terminated at teardown; if the test failed, each process's log tail is
    printed (shown by pytest under "Captured stdout teardown").
    """
    pset = ProcessSet(tmp_path / "logs")
    try:
        yield pset
    finally:
        if len(pset) and _test_failed(request.node):
            print(f"\n===== process logs for {request.node.nodeid} =====")
            print(pset.tails(60))
        pset.close()


def _require_mosquitto() -> None:
    # Interoperability with Mosquitto is a promise of the product, so a missing binary fails the
    # test instead of skipping it (`make test` installs Debian's mosquitto when run as root).
    if not os.access(MOSQUITTO_BIN, os.X_OK):
        pytest.fail(f"{MOSQUITTO_BIN} is not installed: run `make test` as root, or "
                    "apt-get install mosquitto mosquitto-clients")


MosquittoFactory = Callable[..., MosquittoBroker]


@pytest.fixture
def mosquitto_factory(procs: ProcessSet, tmp_path: Path) -> MosquittoFactory:
    """Start extra brokers: ``mosquitto_factory(port=None, allow_anonymous=True, password_file=None,
    extra_conf="")`` -> :class:`MosquittoBroker` (already accepting connections)."""
    _require_mosquitto()

    def start(port: int | None = None, **kwargs: Any) -> MosquittoBroker:
        return start_mosquitto(procs, tmp_path / "mosquitto", port or _free_port(), **kwargs)

    return start


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    """A real anonymous mosquitto on ``127.0.0.1:<free port>``: ``.host``, ``.port``, ``.proc``,
    ``.kill()``, ``.restart()`` (same port)."""
    return mosquitto_factory()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(target_port, target_host="127.0.0.1", listen_port=None)`` -> a started
    :class:`FaultProxy`; all are stopped at teardown."""
    proxies: list[FaultProxy] = []

    def make(target_port: int, target_host: str = "127.0.0.1", listen_port: int | None = None) -> FaultProxy:
        proxy = FaultProxy(listen_port, target_host, target_port).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in reversed(proxies):
            try:
                proxy.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"fault proxy {proxy.port} did not stop cleanly: {exc}", file=sys.stderr)


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """An empty per-test data directory (``<tmp_path>/data``)."""
    path = tmp_path / "data"
    path.mkdir()
    return path
