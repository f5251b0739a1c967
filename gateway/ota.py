"""Firmware files for over-the-air updates, served by the gateway to its site's devices.

A release is a folder ``{ota_dir}/{version}/`` written by ``cwsnet firmware release`` (or
``build``): ``manifest.json`` and the files it lists (``lib/cws/*.mpy``). A device asks on
``cws/v1/{site}/{node}/ota/get`` with a CBOR map ``{"v": version, "path": p, "off": offset,
"n": bytes}`` and gets ``{"v", "path", "off", "size": total, "data": bytes}`` — or ``{"v", "path",
"off", "error": text}`` — on ``.../ota/data`` (docs/protocol.md §8).

Nothing here is sealed or needs to be: the device trusts only what hashes to the manifest hash
in the sealed ``ota`` task command from the cloud. The gateway serves only ``manifest.json`` and
the files a release's manifest lists, never anything else on its disk.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

MAX_CHUNK = 4096
#: requests a device may make per second (sustained) and in a burst; a firmware fetches one chunk
#: at a time, so this is far above what it needs and far below what could starve the gateway
RATE, BURST = 20.0, 40.0
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class OtaServer:
    def __init__(self, ota_dir: Path, max_chunk: int = MAX_CHUNK,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ota_dir = ota_dir
        self.max_chunk = max_chunk
        self.clock = clock
        self._manifests: dict[str, tuple[float, set[str]]] = {}
        self._files_cache: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # node -> (tokens, at)

    def allow(self, node: str) -> bool:
        """A token from ``node``'s bucket (RATE a second, BURST at most): False when it asks too fast."""
        now = self.clock()
        tokens, at = self._buckets.get(node, (BURST, now))
        tokens = min(BURST, tokens + (now - at) * RATE)
        if tokens < 1:
            self._buckets[node] = (tokens, now)
            return False
        self._buckets[node] = (tokens - 1, now)
        return True

    def _read(self, version: str, path: str) -> bytes:
        """A release file, cached while its mtime holds (a device reads it chunk by chunk)."""
        f = self.ota_dir / version / path
        mtime = f.stat().st_mtime
        cached = self._files_cache.get((version, path))
        if cached is not None and cached[0] == mtime:
            return cached[1]
        data = f.read_bytes()
        if len(self._files_cache) > 64:
            self._files_cache.clear()
        self._files_cache[(version, path)] = (mtime, data)
        return data

    def _files(self, version: str) -> set[str]:
        """The paths a release may serve (its manifest's files); KeyError naming why if none."""
        mpath = self.ota_dir / version / "manifest.json"
        try:
            mtime = mpath.stat().st_mtime
        except OSError:
            raise KeyError(f"no firmware release {version!r} at this gateway") from None
        cached = self._manifests.get(version)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            m = json.loads(mpath.read_bytes())
            files = {f["path"] for f in m["files"] if isinstance(f.get("path"), str)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise KeyError(f"release {version!r} has an unreadable manifest.json") from None
        files = {p for p in files if p.startswith("lib/") and ".." not in p.split("/")}
        self._manifests[version] = (mtime, files)
        return files

    def answer(self, request: bytes) -> tuple[dict[str, Any] | None, str | None]:
        """The reply map for one request, and a log line when the request was refused."""
        try:
            req = cbor2.loads(request)
        except Exception:  # noqa: BLE001 - cbor2 raises several types for garbage
            return None, "request is not CBOR"
        if not isinstance(req, dict):
            return None, "request is not a map"
        version, path, off, n = req.get("v"), req.get("path"), req.get("off"), req.get("n", self.max_chunk)
        if not isinstance(version, str) or not isinstance(path, str) or type(off) is not int or type(n) is not int:
            return None, "request needs v (text), path (text), off (int), n (int)"
        reply: dict[str, Any] = {"v": version, "path": path, "off": off}
        if not _VERSION.match(version):
            return {**reply, "error": f"bad version name {version!r}"}, f"bad version name {version!r}"
        try:
            files = self._files(version)  # KeyError if there is no such release
            if path != "manifest.json" and path not in files:
                raise KeyError(f"{path!r} is not in release {version!r}")
            data = self._read(version, path)
        except KeyError as exc:
            return {**reply, "error": exc.args[0]}, exc.args[0]
        except OSError as exc:
            return {**reply, "error": f"{path} unreadable: {exc.strerror}"}, f"{path}: {exc}"
        if off < 0 or off > len(data) or n <= 0:
            return {**reply, "error": f"offset {off} outside {path} ({len(data)} bytes)"}, "bad offset"
        return {**reply, "size": len(data), "data": data[off:off + min(n, self.max_chunk)]}, None

    def reply_bytes(self, request: bytes) -> tuple[bytes | None, str | None]:
        reply, problem = self.answer(request)
        return (cbor2.dumps(reply) if reply is not None else None), problem
