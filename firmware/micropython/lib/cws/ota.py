"""Over-the-air update of the firmware's own files from the gateway (docs/protocol.md §8).

The cloud sends task ``ota`` with ``{"version": V, "manifest_sha256": H}`` (sealed: only the cloud
can start an update). The device asks its gateway for ``manifest.json`` of that version and for
each file in it, in chunks, on ``.../ota/get``; the gateway answers on ``.../ota/data``. Nothing
fetched is trusted until hashed: the manifest must hash to ``H`` and every file to its manifest
entry. Files are staged in ``cwsnet/ota/new`` (the new ``lib/cws``); then ``main.py`` swaps it in at
the next boot and gives it two boots to report healthy — a message it sealed custody-acked by the
gateway within ``ota.health_timeout`` of each boot — else puts the previous firmware back. The task's result
(``succeeded`` with both versions, or ``failed`` with why it rolled back) is sent by whichever
firmware runs after the decision.
"""

import asyncio
import gc
import json
import os
from binascii import hexlify
from hashlib import sha256

from cws import cbor
from cws.buffer import _exists, makedirs
from cws.compat import sleep_ms, wait_for_ms
from cws.tasks import PENDING

STATE, NEW, PREV = "cwsnet/ota/state.json", "cwsnet/ota/new", "cwsnet/ota/prev"
CHUNK = 1024  # small pieces: a fragmented heap has room for them
TRIES = 6


class OTAError(Exception):
    pass


def rmtree(p):
    if not _exists(p):
        return
    if os.stat(p)[0] & 0x4000:
        for name in os.listdir(p):
            rmtree(p + "/" + name)
        os.rmdir(p)
    else:
        os.remove(p)


def _hex(b):
    return str(hexlify(b), "ascii")


def read_state():
    try:
        with open(STATE) as f:
            st = json.load(f)
        return st if isinstance(st, dict) else None
    except (OSError, ValueError):
        return None


def write_state(st):
    makedirs("cwsnet/ota")
    with open(STATE + ".tmp", "w") as f:
        json.dump(st, f)
    os.rename(STATE + ".tmp", STATE)


def check_manifest(m, version):
    """The manifest's files, checked: only ``lib/cws/`` paths, no ``..``, hex hashes, sizes."""
    if not isinstance(m, dict) or m.get("version") != version or not isinstance(m.get("files"), list):
        raise OTAError("manifest is not for version %r" % version)
    files = []
    for f in m["files"]:
        p = f.get("path") if isinstance(f, dict) else None
        if not isinstance(p, str) or not p.startswith("lib/cws/") or ".." in p or "//" in p or p.endswith("/"):
            raise OTAError("manifest names a file outside lib/cws/: %r" % (p,))
        if not isinstance(f.get("sha256"), str) or len(f["sha256"]) != 64 or not isinstance(f.get("size"), int):
            raise OTAError("manifest entry %s lacks its sha256 or size" % p)
        files.append((p, f["sha256"], f["size"]))
    if not any(p == "lib/cws/app.mpy" or p == "lib/cws/app.py" for p, _, _ in files):
        raise OTAError("manifest has no lib/cws/app: it would not boot")
    return files


class Updater:
    def __init__(self, agent, board, version):
        self.agent = agent
        self.board = board
        self.version = version
        self.state = read_state()
        self._want = None  # (version, path, offset) being fetched
        self._got = None
        self._ev = asyncio.Event()
        self.busy = False

    def status(self):
        st = self.state or {}
        out = {"version": self.version}
        if st.get("phase") in ("trial", "rolled_back"):
            out["ota"] = st["phase"]
        return out

    # ---- after a reboot: report what main.py decided ----------------------------------------
    async def watch(self):
        st = self.state
        if not st:
            return
        tid, phase = st.get("task_id"), st.get("phase")
        if phase == "rolled_back":
            if tid and self.agent.tasks is not None:
                self.agent.tasks.result(tid, "failed", error="rolled back to %s: %s" % (self.version, st.get("reason")))
            self._finish()
            return
        if phase == "committed":
            self._report_ok(st)
            return
        if phase != "trial":
            return
        print("ota: on trial (boot %s), waiting up to %d s for the gateway to ack a message of this firmware"
              % (st.get("boots"), self.agent.s.health_timeout))
        try:
            await wait_for_ms(self.agent.healthy.wait(), int(self.agent.s.health_timeout * 1000))
        except asyncio.TimeoutError:
            print("ota: firmware %s not healthy in time: resetting (main.py rolls back after boot %d)"
                  % (self.version, 2))
            self.board.reset()
            return
        st["phase"] = "committed"
        write_state(st)
        self._report_ok(st)

    def _report_ok(self, st):
        if st.get("task_id") and self.agent.tasks is not None:
            self.agent.tasks.result(st["task_id"], "succeeded",
                                    {"version": self.version, "previous": st.get("previous")})
        print("ota: firmware %s committed" % self.version)
        self._finish()

    def _finish(self):
        rmtree(PREV)
        rmtree(NEW)
        try:
            os.remove(STATE)
        except OSError:
            pass
        self.state = None

    # ---- the task handler -------------------------------------------------------------------
    async def handle(self, args):
        version, want = args.get("version"), args.get("manifest_sha256")
        if not isinstance(version, str) or not isinstance(want, str) or len(want) != 64:
            raise OTAError("args must be {'version': text, 'manifest_sha256': 64 hex digits}")
        if version == self.version:
            return {"version": version, "unchanged": True}
        if self.busy or (self.state and self.state.get("phase") in ("swap", "trial")):
            raise OTAError("an update is already in progress")
        self.busy = True
        try:
            raw = await self.fetch(version, "manifest.json", None)
            if _hex(sha256(raw).digest()) != want.lower():
                raise OTAError("manifest of %s does not match manifest_sha256" % version)
            try:
                files = check_manifest(json.loads(raw), version)
            except ValueError:
                raise OTAError("manifest of %s is not JSON" % version) from None
            del raw
            rmtree(NEW)
            makedirs(NEW)
            total = 0
            for path, digest, size in files:
                await self.fetch(version, path, NEW + "/" + path[len("lib/cws/"):], digest, size)
                total += size
            write_state({"phase": "swap", "version": version, "previous": self.version,
                         "task_id": self._task_id(args), "boots": 0})
        except BaseException:
            rmtree(NEW)
            raise
        finally:
            self.busy = False
        print("ota: %s staged (%d files, %d bytes); rebooting into it" % (version, len(files), total))
        asyncio.create_task(self._reboot_soon(self._task_id(args)))
        return PENDING

    def _task_id(self, args):
        tasks = self.agent.tasks
        return tasks.running if tasks is not None else None

    async def _reboot_soon(self, key):
        # let the task runner record this task's PENDING (else the next boot reports it interrupted; the next
        # queued task may start at once, and is then interrupted by the reset, which reports it so) and the
        # 'running' result reach the gateway first (at most 5 s)
        for _ in range(50):
            tasks = self.agent.tasks
            if not self.agent.inflight and not len(self.agent.buf) and (tasks is None or tasks.running != key):
                break
            await sleep_ms(100)
        self.board.reset()

    # ---- the transfer -----------------------------------------------------------------------
    async def fetch(self, version, path, dest, digest=None, size=None):
        """Fetch ``path`` of ``version`` in chunks: into RAM (dest None) or a file, hashed as it comes."""
        h = sha256()
        out = None if dest is None else open(dest, "wb")
        parts = []
        off = 0
        try:
            while True:
                data, total = await self._chunk(version, path, off)
                h.update(data)
                if out is None:
                    parts.append(data)
                else:
                    out.write(data)
                off += len(data)
                if size is not None and off > size:
                    raise OTAError("%s is longer than the manifest says" % path)
                if off >= total or not data:
                    break
                self._got = data = None
                gc.collect()
        finally:
            if out is not None:
                out.close()
        if size is not None and off != size:
            raise OTAError("%s is %d bytes, the manifest says %d" % (path, off, size))
        if digest is not None and _hex(h.digest()) != digest:
            raise OTAError("%s does not match its sha256 in the manifest" % path)
        return b"".join(parts) if out is None else None

    async def _chunk(self, version, path, off):
        req = cbor.dumps({"v": version, "path": path, "off": off, "n": CHUNK})
        topic = self.agent.base + "ota/get"
        for attempt in range(TRIES):
            self._want, self._got = (version, path, off), None
            self._ev.clear()
            if self.agent.mqtt.connected:
                await self.agent.mqtt.publish(topic, req, qos=0)
            try:
                await wait_for_ms(self._ev.wait(), 3000 << min(attempt, 3))
            except asyncio.TimeoutError:
                continue
            got = self._got
            if "error" in got:
                raise OTAError("gateway: %s" % got["error"])
            return got["data"], got["size"]
        raise OTAError("no answer from the gateway for %s at %d" % (path, off))

    async def on_data(self, payload):
        """A reply on ``.../ota/data``: kept only if it answers the request in flight."""
        try:
            m = cbor.loads(payload)
        except ValueError:
            return
        if not isinstance(m, dict) or self._want is None:
            return
        if (m.get("v"), m.get("path"), m.get("off")) != self._want:
            return
        if "error" in m or (isinstance(m.get("data"), bytes) and isinstance(m.get("size"), int)):
            self._got = m
            self._ev.set()
