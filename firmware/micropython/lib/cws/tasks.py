"""Tasks on the device: registered handlers, at most once per task id, results through the buffer.

A handler is ``fn(args) -> dict | None`` (or a coroutine function); built in: ``echo``, ``sha256``,
``sleep`` (docs/protocol.md §3) and, from ``cws.ota``, ``ota``. A module ``cws_handlers`` on the
board (``lib/cws_handlers.py``) can add more: ``def register(handlers): handlers["name"] = fn``.

``cwsnet/state/tasks.json`` remembers the recent task ids and the one running, so a command
delivered twice runs once, and a task cut short by a reset is reported ``failed`` ("interrupted")
at the next start instead of running again.

A scheduled task's command has an ``attempt`` and a ``lease`` (docs/protocol.md §3): each
``(task id, attempt)`` runs once (kept as ``id/attempt``; a higher attempt runs again), its results
echo the attempt, the status lists it in ``tasks`` while it is held (every third of the lease), and
a cancel stops it, queued or running.
"""

import asyncio
import json
import os

from cws.compat import clock_is_set, now_ms

PENDING = object()  # a handler's return value: its result will be reported later (OTA, after a reboot)
CLS_RESULT = 2
CANCELLED = "cancelled by the cloud"


def h_echo(args):
    return args


def h_sha256(args):
    from binascii import a2b_base64, hexlify
    from hashlib import sha256

    data = args.get("data", "")
    if not isinstance(data, str):
        raise ValueError("'data' must be base64 text")
    data = a2b_base64(data.encode())
    return {"sha256": str(hexlify(sha256(data).digest()), "ascii"), "bytes": len(data)}


async def h_sleep(args):
    seconds = args.get("seconds", 1)
    if not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
        raise ValueError("'seconds' must be a number from 0 to 3600")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def _split(key):
    t, _, a = key.partition("/")
    return t, int(a) if a else None


def builtin_handlers():
    return {"echo": h_echo, "sha256": h_sha256, "sleep": h_sleep}


class TaskRunner:
    def __init__(self, agent, handlers, path="cwsnet/state/tasks.json", keep=32):
        self.agent = agent
        self.handlers = handlers
        self.path = path
        self.keep = keep
        self.queue = []
        self.lease = None  # the last lease given: while it holds a leased task, the status goes every third of it
        self.job = self.why = None  # the running handler's asyncio task, and why a cancel stopped it
        self.ev = asyncio.Event()
        self.done, self.running, queued = [], None, []
        try:
            with open(path) as f:
                mem = json.load(f)
            self.done = [t for t in mem.get("done", []) if isinstance(t, str)][-keep:]
            self.running = mem.get("running")
            queued = [t for t in mem.get("queued", []) if isinstance(t, str)]
        except (OSError, ValueError, AttributeError):
            pass
        # a reset cut these short: report them, never run them (a queued task's command is gone
        # with the RAM; its receipt was sent, so the gateway will not deliver it again)
        if isinstance(self.running, str):
            self._report_lost(self.running, "interrupted: restarted while running it")
        for key in queued:
            self._report_lost(key, "interrupted: restarted before running it")
        self.running = None
        self._save()

    def _report_lost(self, key, why):
        self._finish(key, "failed", error=why)

    def _save(self):
        """Persist done, running and queued ids; a flash that refuses is reported, not fatal."""
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"done": self.done, "running": self.running,
                           "queued": self._keys()[1:]}, f)
            os.rename(tmp, self.path)
        except OSError as e:
            print("tasks: could not save %s: %r" % (self.path, e))
            self.agent.storage_error = "tasks: %r" % (e,)

    def _remember(self, task_id):
        if task_id not in self.done:
            self.done.append(task_id)
            del self.done[:-self.keep]

    def result(self, task_id, state, result=None, error=None, started=None):
        task_id, attempt = _split(task_id)  # (a key: id or id/attempt)
        body = {"task_id": task_id, "state": state, "result": result, "error": error,
                "started": started, "finished": now_ms() if state != "running" else None}
        if attempt is not None:
            body["attempt"] = attempt
        if self.agent.store("task/result", "task_result", body, CLS_RESULT) is None and result is not None:
            # a result that cannot be sealed or stored (too big, not encodable): say so instead
            body["state"], body["result"] = "failed", None
            body["error"] = "the result could not be stored: %s" % (self.agent.storage_error,)
            self.agent.store("task/result", "task_result", body, CLS_RESULT)

    def submit(self, body):
        """Queue a command (saved before the caller sends the gateway its receipt), or cancel one."""
        if not isinstance(body, dict) or type(body.get("task_id")) is not str or type(body.get("attempt") or 0) \
                is not int:
            print("bad task command")
            return
        task_id, a = body["task_id"], body.get("attempt")
        if body.get("cancel") is True:
            self._stop(task_id, a, CANCELLED)
            return
        for k in self.done + self._keys():
            t, b = _split(k)
            if t == task_id and (b or 0) >= (a or 0):
                print("repeat", k)
                return
        body["key"] = task_id if a is None else "%s/%d" % (task_id, a)
        if a is not None:
            self._stop(task_id, None, "superseded by attempt %d" % a)  # an older attempt of it still held here
            lease = body.get("lease")
            if type(lease) in (int, float) and lease > 0:
                self.lease = lease
        self.queue.append(body)
        self._save()
        self.ev.set()

    def _stop(self, task_id, a, why):
        """Stop ``task_id`` (only attempt ``a`` if given), queued or running: reported cancelled, ``why``."""
        for b in list(self.queue):
            if b["task_id"] == task_id and a in (None, b.get("attempt")):
                self.queue.remove(b)
                self._finish(b["key"], "cancelled", error=why)
        t, r = _split(self.running or "")
        if self.job and t == task_id and a in (None, r):
            self.why = why
            self.job.cancel()

    def _keys(self):
        return [self.running or ""] + [b["key"] for b in self.queue]

    def held(self):
        """The leased tasks held (queued or running): listed in the status."""
        return [_split(k)[0] for k in self._keys() if "/" in k]

    async def run(self):
        while True:
            await self.ev.wait()
            self.ev.clear()
            while self.queue:
                await self.execute(self.queue.pop(0))

    async def execute(self, body):
        task_id, name = body["key"], body.get("handler")
        args, deadline = body.get("args"), body.get("deadline")
        if args is None:
            args = {}
        if not isinstance(name, str) or not isinstance(args, dict) or \
                (deadline is not None and (not isinstance(deadline, int) or isinstance(deadline, bool))):
            self._finish(task_id, "failed", error="bad command: 'handler' must be text, 'args' a map and "
                                                  "'deadline' an integer or null")
            return
        if deadline is not None and clock_is_set() and now_ms() > deadline:
            self._finish(task_id, "expired", error="received after its deadline")
            return
        fn = self.handlers.get(name)
        if fn is None:
            self._finish(task_id, "failed", error="unknown handler %r; this node has: %s"
                         % (name, ", ".join(sorted(self.handlers))))
            return
        started = now_ms()
        self.running = task_id
        self._save()  # (the queue no longer holds it)
        self.result(task_id, "running", started=started)
        try:
            out = fn(args)
            if out is not None and hasattr(out, "send"):
                self.job = asyncio.create_task(out)
                out = await self.job
            if out is PENDING:
                state = None
            elif out is not None and not isinstance(out, dict):
                state, out, err = "failed", None, "handler returned %s, not a map" % type(out).__name__
            else:
                state, err = "succeeded", None
        except asyncio.CancelledError:
            if not self.why:  # the agent is stopping, not a cancel
                raise
            state, out, err = "cancelled", None, self.why
        except Exception as e:  # noqa: BLE001 - a failing handler is a failed task, not a dead agent
            state, out, err = "failed", None, "%s: %s" % (type(e).__name__, e)
        self.job = self.why = None
        if state is None:  # PENDING: reported later by whoever finishes it
            self.running = None
            self._remember(task_id)
            self._save()
        else:
            self._finish(task_id, state, out, err, started)

    def _finish(self, task_id, state, result=None, error=None, started=None):
        """Buffer the result first, then forget the task: a power cut in between repeats a
        report ("interrupted" after the real one), it never loses one."""
        self.result(task_id, state, result, error, started)
        if self.running == task_id:
            self.running = None
        self._remember(task_id)
        self._save()
