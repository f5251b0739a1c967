"""`cwsnet firmware build|release`: the ESP32 firmware compiled with the real mpy-cross.

Most tests build a small firmware tree written here (the real one is being written while these run);
one builds a copy of the checkout's firmware/micropython. The .mpy files are checked by their header,
the manifest by hashing what it lists, the release against the gateway's OTA folder and the cloud's
task model, and the generated version module under the real MicroPython unix port.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cwsnet
from cloud.api import TaskRequest
from cwsnet import firmware
from cwsnet.cli import main
from cwsnet.homelab import HomeLab, Topology

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO / "firmware" / "micropython"
MICROPYTHON = Path(sys.executable).parent / "micropython"
INSTALL = "run `.venv/bin/pip install -e '.[dev]'`"

MODULES = {
    "__init__.py": '"""a small firmware for the build tests"""\n',
    "alpha.py": "X = 1\n\n\ndef double(v):\n    return 2 * v\n",
    "beta.py": "from cws import alpha\n\n\ndef quad(v):\n    return alpha.double(alpha.double(v))\n",
}
NATIVE = "import micropython\n\n\n@micropython.native\ndef add(a, b):\n    return a + b\n"


def make_tree(root: Path, modules: dict[str, str] | None = None, main_py: str = "import cws.beta\n") -> Path:
    pkg = root / "lib" / "cws"
    pkg.mkdir(parents=True)
    for name, text in (MODULES if modules is None else modules).items():
        (pkg / name).write_text(text)
    (root / "main.py").write_text(main_py)
    return root


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def only_version(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_mpy_cross_is_installed() -> None:
    exe = Path(sys.executable).parent / "mpy-cross"
    assert exe.exists(), f"{exe}: mpy-cross is a cwsnet dependency; {INSTALL}"
    assert firmware.mpy_cross() == str(exe)


def test_build_writes_mpy_files_main_py_and_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_tree(tmp_path / "src")
    code, out, err = cli(capsys, "firmware", "build", "--source", str(src), "--out", str(tmp_path / "out"))
    assert code == 0, err
    built = only_version(tmp_path / "out")
    version = built.name
    assert re.fullmatch(re.escape(cwsnet.__version__) + r"\+[0-9a-f]{8}", version), version  # no cws.__version__
    files = tree_bytes(built)
    assert sorted(files) == ["lib/cws/__init__.mpy", "lib/cws/alpha.mpy", "lib/cws/beta.mpy", "lib/cws/version.mpy",
                             "main.py", "manifest.json"]
    assert files["main.py"] == (src / "main.py").read_bytes()  # the loader stays source

    raw = files["manifest.json"]
    manifest = json.loads(raw)
    assert manifest["format"] == 1 and manifest["version"] == version
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths) == sorted(p for p in files if p.startswith("lib/"))  # every lib/ file, no main.py
    for entry in manifest["files"]:
        data = files[entry["path"]]
        assert entry == {"path": entry["path"], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    # the printed table: every file with its size, the total, the manifest's hash over its exact bytes
    for path, data in files.items():
        if path != "manifest.json":
            assert re.search(rf"^  {re.escape(path)} +{len(data)}\b", out, re.M), (path, out)
    total = sum(len(d) for p, d in files.items() if p != "manifest.json")
    assert re.search(rf"^  total +{total} bytes in 5 files$", out, re.M), out
    assert f"sha256 {hashlib.sha256(raw).hexdigest()}" in out
    assert "(generated)" in next(line for line in out.splitlines() if "version.mpy" in line)


def test_mpy_headers_name_the_esp32(tmp_path: Path) -> None:
    """'M', .mpy version 6, 31-bit small ints (the ESP32's); the architecture is recorded once a
    module holds native code: xtensawin by default, what --arch says otherwise."""
    src = make_tree(tmp_path / "src", {**MODULES, "fast.py": NATIVE})
    built = firmware.build(tmp_path / "out", root=src)
    for f in built.lib_files:
        data = (built.dir / f.path).read_bytes()
        assert data[:2] == b"M\x06", f.path
        mpy_version, arch, small_int_bits = firmware.mpy_header(data)
        assert (mpy_version, small_int_bits) == (6, 31), f.path
        want = "xtensawin" if f.path.endswith("fast.mpy") else "none"  # bytecode alone runs on any CPU
        assert firmware.ARCH_NUMBERS[arch] == want, (f.path, arch)
    x64 = firmware.build(tmp_path / "out-x64", root=src, arch="x64")
    assert firmware.ARCH_NUMBERS[firmware.mpy_header((x64.dir / "lib/cws/fast.mpy").read_bytes())[1]] == "x64"
    assert x64.version != built.version  # another architecture is another build
    with pytest.raises(ValueError):
        firmware.mpy_header(b"#!python")


def test_the_build_is_reproducible_and_versions_follow_the_sources(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    a = firmware.build(tmp_path / "a", root=src)
    b = firmware.build(tmp_path / "b", root=src)
    assert a.version == b.version and a.manifest_sha256 == b.manifest_sha256
    assert tree_bytes(a.dir) == tree_bytes(b.dir)
    again = firmware.build(tmp_path / "a", root=src)  # into the same folder: kept as it is
    assert tree_bytes(again.dir) == tree_bytes(a.dir) and [p.name for p in (tmp_path / "a").iterdir()] == [a.version]
    # the staging folder embeds no local path: a copy of the tree elsewhere builds the same bytes
    moved = shutil.copytree(src, tmp_path / "elsewhere" / "tree")
    assert tree_bytes(firmware.build(tmp_path / "c", root=moved).dir) == tree_bytes(a.dir)

    (src / "lib/cws/alpha.py").write_text(MODULES["alpha.py"] + "Y = 2\n")
    changed = firmware.build(tmp_path / "a", root=src)
    assert changed.version != a.version and changed.version.split("+")[0] == a.version.split("+")[0]
    (src / "main.py").write_text("import cws.alpha\n")
    assert firmware.build(tmp_path / "a", root=src).version not in (a.version, changed.version)

    (src / "lib/cws/__init__.py").write_text('__version__ = "2.0.1"\n')
    assert re.fullmatch(r"2\.0\.1\+[0-9a-f]{8}", firmware.build(tmp_path / "a", root=src).version)


def test_version_module_runs_under_micropython(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON}: the MicroPython unix port; {INSTALL}"
    src = make_tree(tmp_path / "src")
    built = firmware.build(tmp_path / "out", root=src, version="1.2.3-rc.1+lab")
    assert built.dir == tmp_path / "out" / "1.2.3-rc.1+lab"
    # a version.py among the sources is replaced by the generated one
    (src / "lib/cws/version.py").write_text('VERSION = "dev"\n')
    built = firmware.build(tmp_path / "out", root=src, version="1.2.3-rc.1+lab")
    r = subprocess.run([str(MICROPYTHON), "-c", "import cws.version, cws.beta; print(cws.version.VERSION, "
                        "cws.beta.quad(3)); import sys; print(sys.modules['cws.beta'].__file__)"],
                       env=dict(os.environ, MICROPYPATH=str(built.dir / "lib")), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1.2.3-rc.1+lab 12" and lines[1].endswith("lib/cws/beta.mpy"), r.stdout


def test_the_checkouts_firmware_builds(tmp_path: Path) -> None:
    """Whatever firmware/micropython holds today compiles, each module into lib/cws/NAME.mpy."""
    src = shutil.copytree(FIRMWARE, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    if not (src / "main.py").exists():  # the loader is still being written
        (src / "main.py").write_text("import cws\n")
    built = firmware.build(tmp_path / "out", root=src)
    names = {f"lib/cws/{p.stem}.mpy" for p in (FIRMWARE / "lib/cws").glob("*.py")} | {"lib/cws/version.mpy"}
    assert {f.path for f in built.lib_files} == names
    assert built.version.startswith(firmware.base_version(FIRMWARE) + "+")


def test_a_compile_error_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_tree(tmp_path / "src", {**MODULES, "broken.py": "def broken(:\n    pass\n"})
    code, out, err = cli(capsys, "firmware", "build", "--source", str(src), "--out", str(tmp_path / "out"))
    assert code == 1, (out, err)
    assert f"mpy-cross -march=xtensawin failed on {src / 'lib/cws/broken.py'}:" in err
    assert "SyntaxError" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "out").iterdir()]  # nothing half-built is left

    (src / "lib/cws/broken.py").unlink()
    (src / "main.py").write_text("if:\n")
    code, out, err = cli(capsys, "firmware", "build", "--source", str(src), "--out", str(tmp_path / "out"))
    assert code == 1 and f"failed on {src / 'main.py'}" in err and "SyntaxError" in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["--version", "../evil"], "--version: '../evil' is not a firmware version"),
    (["--version", "a/b"], "is not a firmware version"),
    (["--source", "/nonexistent/firmware"], "--source /nonexistent/firmware: no lib/cws folder"),
])
def test_build_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    src = make_tree(tmp_path / "src")
    argv = ["firmware", "build", "--out", str(tmp_path / "out"), *args]
    if "--source" not in args:
        argv += ["--source", str(src)]
    code, _out, err = cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_build_needs_the_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_tree(tmp_path / "src")
    (src / "main.py").unlink()
    code, _out, err = cli(capsys, "firmware", "build", "--source", str(src), "--out", str(tmp_path / "out"))
    assert code == 2 and "main.py: the firmware's loader is missing" in err, err


def test_build_defaults_to_build_firmware(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tree(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    code, _out, err = cli(capsys, "firmware", "build", "--source", str(src))
    assert code == 0, err
    assert (only_version(tmp_path / "build" / "firmware") / "manifest.json").is_file()


# ---- release ------------------------------------------------------------------------------------------
@pytest.fixture
def lab(tmp_path: Path) -> Path:
    data = tmp_path / "lab"
    HomeLab(data).init(Topology(devices=["kitchen"]))
    return data


def test_release_builds_into_the_gateway_ota_folder(tmp_path: Path, lab: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = make_tree(tmp_path / "src")
    code, out, err = cli(capsys, "firmware", "release", "--data-dir", str(lab), "--source", str(src))
    assert code == 0, err
    built = only_version(lab / "gateway" / "ota")
    raw = (built / "manifest.json").read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    assert json.loads(raw)["version"] == built.name
    line = next(line for line in out.splitlines() if line.startswith("  POST /api/v1/tasks "))
    body = json.loads(line.removeprefix("  POST /api/v1/tasks "))
    assert body == {"target": "<device>", "handler": "ota", "args": {"version": built.name, "manifest_sha256": sha}}
    TaskRequest.model_validate({**body, "target": "kitchen"})  # what the cloud's API accepts
    assert f"serves {built}" in out and "Authorization: Bearer $(cat " in out and "/api/v1/tasks" in out
    # the same build again: unchanged; another build under the same version: refused
    code, _out, err = cli(capsys, "firmware", "release", "--data-dir", str(lab), "--source", str(src))
    assert code == 0, err
    code, _out, err = cli(capsys, "firmware", "release", "--data-dir", str(lab), "--source", str(src),
                          "--version", "0.9")
    assert code == 0, err
    (src / "lib/cws/alpha.py").write_text("X = 2\n")
    code, _out, err = cli(capsys, "firmware", "release", "--data-dir", str(lab), "--source", str(src),
                          "--version", "0.9")
    assert code == 2 and "already holds a different build of version 0.9" in err, err
    assert (lab / "gateway/ota/0.9/lib/cws/alpha.mpy").read_bytes() != b""
    assert sorted(p.name for p in (lab / "gateway" / "ota").iterdir()) == sorted([built.name, "0.9"])


def test_release_needs_a_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_tree(tmp_path / "src")
    code, _out, err = cli(capsys, "firmware", "release", "--data-dir", str(tmp_path / "none"), "--source", str(src))
    assert code == 2 and "no home lab here" in err, err
