"""Task handlers: plugins from the ``cwsnet.handlers`` entry-point group, the opt-in ``shell``."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from cwsnet.errors import ConfigError
from edge_agent import handlers


def _dist(root: Path, name: str, entry: str, module: str, code: str) -> None:
    (root / f"{module}.py").write_text(code)
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[cwsnet.handlers]\n{entry}\n")


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in ("good_plugin", "bad_plugin", "sync_plugin"):
        sys.modules.pop(mod, None)


def test_plugins_register_by_entry_point_and_broken_ones_are_left_out(
        plugin_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _dist(plugin_path, "good", "double = good_plugin:double", "good_plugin",
          "async def double(args):\n    return {'twice': args['x'] * 2}\n")
    _dist(plugin_path, "bad", "boom = bad_plugin:boom", "bad_plugin", "raise ImportError('missing numpy')\n")
    _dist(plugin_path, "syncy", "plain = sync_plugin:plain", "sync_plugin", "def plain(args):\n    return {}\n")
    _dist(plugin_path, "shadow", "echo = good_plugin:double", "good_plugin2", "")
    found = handlers.plugins()
    assert set(found) == {"double"}
    assert asyncio.run(found["double"]({"x": 21})) == {"twice": 42}
    text = caplog.text
    assert "boom = bad_plugin:boom (bad) cannot be loaded: ImportError: missing numpy" in text
    assert "plain = sync_plugin:plain (syncy) is not an async function" in text
    assert "echo (shadow) ignored: a built-in handler has that name" in text
    assert set(handlers.registry(["echo", "double"])) == {"echo", "double"}
    assert "double" in handlers.defaults() and "shell" not in handlers.defaults()
    with pytest.raises(ConfigError, match="unknown handler.*'nope'.*cwsnet.handlers"):
        handlers.registry(["nope"])


def test_shell_runs_a_program_without_a_shell_and_only_where_listed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CWSNET_SECRET_FOR_TEST", "s3cret")
    assert "shell" not in handlers.BUILTIN and "shell" in handlers.registry(["shell"])
    out = asyncio.run(handlers.shell({"argv": [sys.executable, "-c", "import sys; print('hi $HOME'); "
                                               "sys.stderr.write('e'); sys.exit(3)"], "cwd": str(tmp_path)}))
    assert out == {"exit": 3, "stdout": "hi $HOME\n", "stderr": "e", "truncated": False}
    # output past 64 KB is read and dropped (never held in memory, never blocking the program)
    big = asyncio.run(handlers.shell({"argv": [sys.executable, "-c", "import sys; sys.stdout.write('x' * 3_000_000)"]}))
    assert big["exit"] == 0 and len(big["stdout"]) == handlers.SHELL_OUTPUT_MAX and big["truncated"]
    # the daemon's environment is not passed on
    env = asyncio.run(handlers.shell({"argv": [sys.executable, "-c", "import os; print(sorted(os.environ))"]}))
    assert "CWSNET_SECRET_FOR_TEST" not in env["stdout"] and "PATH" in env["stdout"]
    with pytest.raises(handlers.TaskFailed, match="still running after 0.2 s: killed"):
        asyncio.run(handlers.shell({"argv": [sys.executable, "-c", "import time; time.sleep(30)"], "timeout": 0.2}))
    for bad in ({"argv": "ls -l"}, {"argv": []}, {"argv": ["ls"], "timeout": 0}, {"argv": ["ls"], "cwd": 3}):
        with pytest.raises(handlers.TaskFailed):
            asyncio.run(handlers.shell(bad))
    with pytest.raises(handlers.TaskFailed, match="cannot run '/no/such/program'"):
        asyncio.run(handlers.shell({"argv": ["/no/such/program"]}))


def test_count_refuses_a_checkpoint_flood() -> None:
    with pytest.raises(handlers.TaskFailed, match="every must be at least 1000 for to=1000000"):
        asyncio.run(handlers.count({"to": 1_000_000, "every": 1}, handlers.TaskContext("t")))
