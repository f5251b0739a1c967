# The firmware's task runner as an executor of the cloud's scheduler (protocol §3), under MicroPython
# (tests/test_firmware_core.py runs it): attempts, supersede, cancels by attempt, leases. argv = [script, state_dir]
import asyncio
import sys

from cws import tasks as T

STATE = sys.argv[1] + "/tasks.json"


class Agent:
    storage_error = None

    def __init__(self):
        self.sent = []

    def store(self, channel, kind, body, cls):
        self.sent.append(dict(body))
        return 1


runs = []


async def act(args):
    runs.append(args.get("n"))
    await asyncio.sleep(args.get("s", 0.2))
    return {"n": args.get("n")}


def states(agent, tid):
    return [(b["state"], b.get("attempt")) for b in agent.sent if b["task_id"] == tid]


async def main():
    a = Agent()
    r = T.TaskRunner(a, {"act": act}, path=STATE)
    job = asyncio.create_task(r.run())
    # attempt 2 arrives while attempt 1 runs: 1 is stopped (superseded), 2 runs; a late attempt 1 does not
    r.submit({"task_id": "t1", "handler": "act", "args": {"n": 1, "s": 5}, "attempt": 1, "lease": 30})
    await asyncio.sleep(0.05)
    print("held", r.held())
    r.submit({"task_id": "t1", "handler": "act", "args": {"n": 2}, "attempt": 2, "lease": 30})
    await asyncio.sleep(0.5)
    r.submit({"task_id": "t1", "handler": "act", "args": {"n": 3}, "attempt": 1, "lease": 30})
    await asyncio.sleep(0.3)
    print("t1", runs, states(a, "t1"), [b.get("error") for b in a.sent if b["state"] == "cancelled"])
    # a cancel of another attempt leaves the running one alone; its own attempt stops it
    r.submit({"task_id": "t2", "handler": "act", "args": {"n": 9, "s": 5}, "attempt": 2, "lease": 3})
    await asyncio.sleep(0.05)
    r.submit({"task_id": "t2", "cancel": True, "attempt": 1})
    await asyncio.sleep(0.05)
    print("t2 after a cancel of attempt 1", states(a, "t2"), r.lease)
    r.submit({"task_id": "t2", "cancel": True, "attempt": 2})
    await asyncio.sleep(0.05)
    print("t2", states(a, "t2"), r.held())
    # a lease that is not a positive number is taken as none (the previous one stays)
    r.submit({"task_id": "t3", "handler": "act", "args": {"n": 4, "s": 0}, "attempt": 1, "lease": "x"})
    r.submit({"task_id": "t4", "handler": "act", "args": {"n": 5, "s": 0}, "attempt": 1, "lease": -1})
    await asyncio.sleep(0.2)
    print("lease", r.lease)
    job.cancel()
    print("END")


asyncio.run(main())
