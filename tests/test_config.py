"""Config files: bad input gets `file:line: field: problem`, and the CLI exits non-zero with no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cwsnet.config import AgentConfig, CloudConfig, GatewayConfig, load_config
from cwsnet.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_valid_agent_config_resolves_relative_paths(tmp_path: Path) -> None:
    p = write(tmp_path, "identity_file: keys/dev.json\nbroker:\n  port: 1999\nsensors:\n  - type: simulated\n"
                        "    stream: env\n    interval: 0.5\n")
    cfg = load_config(p, AgentConfig)
    assert cfg.identity_file == (tmp_path / "keys/dev.json").resolve()
    assert cfg.broker.port == 1999 and cfg.sensors[0].stream == "env"


def test_unknown_key_names_file_line_and_field(tmp_path: Path) -> None:
    p = write(tmp_path, "identity_file: x.json\nbroker:\n  host: h\n  prot: 1883\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, AgentConfig)
    assert str(e.value) == f"{p}:4: broker.prot: unknown key"


def test_wrong_type_names_line_field_and_value(tmp_path: Path) -> None:
    p = write(tmp_path, "identity_file: x.json\nstatus_interval: soon\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, AgentConfig)
    assert f"{p}:2: status_interval:" in str(e.value) and "'soon'" in str(e.value)


def test_nested_list_item_error_points_at_its_line(tmp_path: Path) -> None:
    p = write(tmp_path, "identity_file: x.json\nsensors:\n  - type: system\n    stream: s\n  - type: lava\n"
                        "    stream: t\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, AgentConfig)
    assert f"{p}:5: sensors.1.type:" in str(e.value)


def test_bad_stream_name_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "identity_file: x.json\nsensors:\n  - type: system\n    stream: a/b\n")
    with pytest.raises(ConfigError, match="sensors.0.stream"):
        load_config(p, AgentConfig)


def test_missing_required_field(tmp_path: Path) -> None:
    p = write(tmp_path, "identity_file: x.json\n")
    with pytest.raises(ConfigError, match="uplink: required field is missing"):
        load_config(p, GatewayConfig)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", CloudConfig)
    p = write(tmp_path, "identity_file: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+:\d+: not valid YAML"):
        load_config(p, CloudConfig)
    p = write(tmp_path, "a: 1\na: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(p, CloudConfig)


@pytest.mark.parametrize("daemon", ["cloud", "gateway", "agent"])
def test_cli_bad_config_exits_nonzero_without_traceback(tmp_path: Path, daemon: str) -> None:
    p = write(tmp_path, "identity_file: x.json\nbogus: 1\n")
    r = subprocess.run([sys.executable, "-m", "cwsnet", daemon, "--config", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{p}:2: bogus: unknown key" in r.stderr


def test_cli_missing_config_file(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "cwsnet", "agent", "--config", str(tmp_path / "gone.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "gone.yaml: config file not found" in r.stderr and "Traceback" not in r.stderr
