"""Randomized model test of the scheduler (cwsnet/scheduler.py), in the spirit of
tests/test_custody_model.py: the REAL Scheduler and the shipped offload policy, driven by a simulated
fleet through random sequences of submissions (with repeated idempotency keys, replicas, deadlines),
ticks, clock jumps, heartbeats, status reports, executor deaths (silent, or reported gone),
partitioned executors coming back with stale beliefs, late results, checkpoints, failures, wrong
results, cancels and drains.

Executors act on what they were told: an ``Assign`` adds the task to what the node believes it runs,
a ``Cancel`` reaching a live node removes it; a dead node hears nothing and keeps its beliefs, so when
it comes back its results are late.

Checked after every step:

(a) a task that ended has exactly one ``Completed`` (its effect), with its final state; a live task
    has none: no effect is recorded twice, none is lost;
(b) no task is held by two copies on one executor, nor by more executors than its replicas; every
    holder is live and lists the task among its running set, and no executor exceeds its slots;
(c) a result, start or checkpoint from an executor that does not hold the current lease is ignored
    (``Ignored``) and has no effect; one from the holder is never ignored; a ``succeeded`` result is
    one its holder reported;
(d) every ``Assign`` goes to a live executor that is not draining, of the task's site or the cloud,
    never a cloud executor for health data, never a device for a device's input of 64 KB or more
    (what the shipped offload policy allows);
(e) one idempotency key never makes two tasks;
(f) after a tick, no executor holds a task while silent for the lease or longer.

Then a fault-free completion (every executor back and answering) must end every task: each ends
exactly once in a terminal state. Mutants of the scheduler (a late result accepted, replicas on one
executor, a lost executor keeping its tasks, no deduplication) must each be caught, which shows the
checker can fail. ``pytest -s`` prints the counts of what happened.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from typing import Any

import pytest

from cwsnet.policy import load_policies
from cwsnet.policy.offload import OffloadEngine
from cwsnet.policy.watch import shipped_policies
from cwsnet.scheduler import (
    Assign,
    Cancel,
    Completed,
    Drained,
    ExecutorLost,
    ExecutorStatus,
    Ignored,
    Requeued,
    Scheduler,
    Submitted,
    Task,
)

LEASE = 5.0
SEEDS = 120
STEPS = 160
# node -> (tier, site, slots, lists its tasks in heartbeats)
NODES: dict[str, tuple[str, str, int, bool]] = {
    "dev-h1": ("device", "home", 1, True),
    "dev-h2": ("device", "home", 2, False),
    "gw-home": ("gateway", "home", 2, True),
    "dev-l1": ("device", "lab", 1, False),
    "gw-lab": ("gateway", "lab", 2, True),
    "cloud-1": ("cloud", "", 3, True),
    "cloud-2": ("cloud", "", 2, False),
}
DEVICES = {"home": ["dev-h1", "dev-h2"], "lab": ["dev-l1"]}


@functools.cache
def engine() -> OffloadEngine:
    return OffloadEngine(load_policies([shipped_policies()]))


class Violation(AssertionError):
    pass


class Sim:
    def __init__(self, seed: int, cls: type[Scheduler] = Scheduler) -> None:
        self.r = random.Random(seed)
        self.s = cls(engine(), lease=LEASE)
        self.now = 0.0
        self.alive = dict.fromkeys(NODES, True)
        self.believes: dict[str, dict[str, int]] = {n: {} for n in NODES}
        self.completed: Counter[str] = Counter()
        self.reported: dict[str, list[Any]] = {}  # task -> results its holders reported (accepted)
        self.created: dict[str, set[str]] = {}  # idempotency key -> tasks created under it
        self.seen: Counter[str] = Counter()
        self.n = 0
        self.trace: list[str] = []
        for node in NODES:
            self.status(node)

    def fail(self, why: str) -> None:
        raise Violation(why + "\ntrace (last 25): " + " | ".join(self.trace[-25:]))

    # ---- the fleet's side ----
    def status(self, node: str) -> None:
        tier, site, slots, lists = NODES[node]
        cpu = self.r.choice([0.1, 0.5, 0.95])
        running = tuple(self.believes[node]) if lists else None
        self.apply(self.s.executor_seen(ExecutorStatus(node, tier, site, slots, cpu=cpu, running=running), self.now))

    def beat(self, node: str) -> None:
        if NODES[node][3]:
            self.apply(self.s.heartbeat(node, list(self.believes[node]), self.now))
        else:
            self.status(node)

    def apply(self, cmds: list[Any]) -> None:
        for c in cmds:
            if isinstance(c, Assign):
                self.check_assign(c)
                self.believes[c.node][c.task_id] = c.attempt
                self.seen["assign"] += 1
                if c.checkpoint is not None and c.attempt > 1:
                    self.seen["resumed from a checkpoint"] += 1
            elif isinstance(c, Cancel):
                if self.alive[c.node]:  # a dead node hears nothing
                    if self.believes[c.node].pop(c.task_id, None) is not None:
                        self.seen["cancel reached a node"] += 1
                if c.reason.startswith("the task succeeded elsewhere"):
                    self.seen["other replicas cancelled"] += 1
                if "no longer holds" in c.reason:
                    self.seen["stale node told to stop"] += 1
            elif isinstance(c, Completed):
                self.completed[c.task_id] += 1
                t = self.s.tasks[c.task_id]
                if self.completed[c.task_id] > 1:
                    self.fail(f"(a) {c.task_id} completed twice: {c}")
                if c.state != t.state:
                    self.fail(f"(a) {c.task_id}: Completed says {c.state}, the task is {t.state}")
                if c.state == "succeeded" and not any(c.result == r for r in self.reported.get(c.task_id, [])):
                    self.fail(f"(c) {c.task_id} succeeded with {c.result}, which no holder reported")
                self.seen[f"completed {c.state}"] += 1
                if c.disagreement:
                    self.seen["disagreement flagged"] += 1
                if c.error and c.error.startswith("no majority possible"):
                    self.seen["no majority possible"] += 1
                if c.error and "gave up after" in c.error:
                    self.seen["gave up after its attempts"] += 1
            elif isinstance(c, ExecutorLost):
                self.seen["executor lost: " + ("silent" if "silent" in c.reason else "gone")] += 1
            elif isinstance(c, Requeued):
                self.seen["requeued: " + ("not reported" if "not reported" in c.reason else
                                          "failed" if "failed on" in c.reason else
                                          "draining" if "draining" in c.reason else "lease lost")] += 1
            elif isinstance(c, Drained):
                self.seen["drained"] += 1
                if self.s.executors[c.node].running:
                    self.fail(f"drained {c.node} still holds {self.s.executors[c.node].running}")
            elif isinstance(c, Ignored):
                self.seen["ignored"] += 1
            elif isinstance(c, Submitted) and c.duplicate:
                self.seen["duplicate submission"] += 1

    def check_assign(self, a: Assign) -> None:
        ex = self.s.executors[a.node]
        t = self.s.tasks[a.task_id]
        if not ex.live or ex.draining:
            self.fail(f"(d) {a.task_id} assigned to {a.node}, live={ex.live} draining={ex.draining}")
        if ex.tier != "cloud" and ex.site != t.site:
            self.fail(f"(d) {a.task_id} of site {t.site} assigned to {a.node} of site {ex.site}")
        if t.data_class == "health" and ex.tier == "cloud":
            self.fail(f"(d) health task {a.task_id} assigned to cloud executor {a.node}")
        if t.origin_role == "device" and t.input_bytes >= 64 * 1024 and ex.tier == "device":
            self.fail(f"(d) {a.task_id}: a device's 64 KB input assigned to device {a.node}")

    def holds(self, tid: str, node: str, attempt: int) -> bool:
        t = self.s.tasks.get(tid)
        return t is not None and not t.terminal and any(c.holds and c.node == node and c.attempt == attempt
                                                        for c in t.copies)

    def report(self, node: str, tid: str, what: str, late: bool = False) -> None:
        """``node`` says something about ``tid`` (which it believes it runs)."""
        attempt = self.believes[node][tid]
        holder = self.holds(tid, node, attempt)
        said = self.r.choice([attempt, None])
        if what == "start":
            cmds = self.s.started(tid, node, self.now, said)
        elif what == "checkpoint":
            cmds = self.s.checkpoint(tid, node, {"step": self.r.randint(1, 9), "by": node}, self.now, said)
        else:
            ok = what == "ok"
            result = {"v": tid} if self.r.random() > 0.15 else {"v": f"wrong-{node}"}
            if holder and ok:
                self.reported.setdefault(tid, []).append(result)
            cmds = self.s.finished(tid, node, ok, result if ok else None, None if ok else "boom", self.now, said)
            del self.believes[node][tid]
        ignored = any(isinstance(c, Ignored) for c in cmds)
        if holder and ignored:
            self.fail(f"(c) {what} from the lease holder {node} of {tid} was ignored: {cmds}")
        if not holder:
            if not ignored:
                self.fail(f"(c) {what} from {node}, which does not hold {tid}'s lease, was not ignored: {cmds}")
            if any(isinstance(c, Completed) for c in cmds):
                self.fail(f"(c) {what} from non-holder {node} completed {tid}")
            if late and what in ("ok", "fail"):
                self.seen["late result ignored"] += 1
        self.apply(cmds)

    # ---- random steps ----
    def submit(self) -> None:
        r = self.r
        self.n += 1
        site = r.choice(["home", "home", "lab"])
        by_device = r.random() < 0.7
        origin = r.choice(DEVICES[site]) if by_device else "app-1"
        replicas = r.choice([1, 1, 1, 2, 3])
        deadline = self.now + r.uniform(10, 120) if replicas > 1 or r.random() < 0.3 else None
        key = f"k{r.randint(1, 25)}" if r.random() < 0.5 else None
        t = Task(f"t{self.n}", "echo", {"n": self.n}, data_class=r.choice([None, "health", "metrics"]),
                 input_bytes=r.choice([100, 100 * 1024]), origin=origin, site=site,
                 origin_role="device" if by_device else "app", deadline=deadline, priority=r.randint(0, 9),
                 max_attempts=r.randint(1, 3), backoff=r.choice([0.0, 0.5, 2.0]), replicas=replicas,
                 mode=r.choice(["first", "majority"]), idempotency_key=key)
        cmds = self.s.submit(t, self.now)
        if key is not None and not cmds[0].duplicate:
            self.created.setdefault(key, set()).add(cmds[0].task_id)
        self.apply(cmds)

    def step(self) -> None:
        r = self.r
        alive = [n for n in NODES if self.alive[n]]
        dead = [n for n in NODES if not self.alive[n]]
        busy = [n for n in alive if self.believes[n]]
        stale = [n for n in dead if self.believes[n]]
        choice = r.choices(["submit", "tick", "advance", "beat", "report", "late", "die", "gone", "revive",
                            "cancel", "drain", "undrain"],
                           [3, 3, 3, 4, 6, 1, 0.6, 0.4, 1, 0.4, 0.3, 0.3])[0]
        self.trace.append(f"{self.now:.1f}:{choice}")
        if choice == "submit":
            self.submit()
        elif choice == "tick":
            self.apply(self.s.tick(self.now))
            self.after_tick()
        elif choice == "advance":
            self.now += r.uniform(0, 3)
        elif choice == "beat" and alive:
            self.beat(r.choice(alive))
        elif choice == "report" and busy:
            node = r.choice(busy)
            tid = r.choice(sorted(self.believes[node]))
            what = r.choices(["start", "checkpoint", "ok", "fail"], [2, 1, 3, 1])[0]
            self.trace[-1] += f" {what} {node} {tid}"
            self.report(node, tid, what)
        elif choice == "late" and stale:  # a partitioned node comes back and reports
            node = r.choice(stale)
            self.alive[node] = True
            tid = r.choice(sorted(self.believes[node]))
            self.trace[-1] += f" {node} {tid}"
            self.report(node, tid, r.choice(["ok", "fail", "checkpoint"]), late=True)
        elif choice == "die" and alive:
            node = r.choice(alive)
            self.alive[node] = False
            self.trace[-1] += f" {node}"
        elif choice == "gone" and alive:
            node = r.choice(alive)
            self.alive[node] = False
            self.trace[-1] += f" {node}"
            self.apply(self.s.executor_gone(node, self.now))
        elif choice == "revive" and dead:
            node = r.choice(dead)
            self.alive[node] = True
            self.trace[-1] += f" {node}"
            self.status(node)
        elif choice == "cancel" and self.s.tasks:
            self.apply(self.s.cancel(r.choice(sorted(self.s.tasks)), self.now))
        elif choice == "drain":
            self.apply(self.s.drain(r.choice(sorted(NODES)), self.now))
        elif choice == "undrain":
            self.apply(self.s.undrain(r.choice(sorted(NODES)), self.now))
        self.check()

    def after_tick(self) -> None:
        for ex in self.s.executors.values():
            if ex.running and self.now - ex.last_seen >= LEASE:
                self.fail(f"(f) after a tick, {ex.node} holds {sorted(ex.running)} though silent for "
                          f"{self.now - ex.last_seen:.1f} s")

    def check(self) -> None:
        s = self.s
        for tid, t in s.tasks.items():
            holders = [c.node for c in t.copies if c.holds]
            if len(holders) != len(set(holders)) or len(holders) > t.replicas:
                self.fail(f"(b) {tid} held by {holders} (replicas {t.replicas})")
            for node in holders:
                ex = s.executors[node or ""]
                if tid not in ex.running or not ex.live:
                    self.fail(f"(b) {tid} held by {node}, which is live={ex.live} and runs {sorted(ex.running)}")
            if t.terminal:
                if holders or any(c.state == "queued" for c in t.copies):
                    self.fail(f"(a) {tid} is {t.state} but copies are {[c.state for c in t.copies]}")
                if self.completed[tid] != 1:
                    self.fail(f"(a) {tid} is {t.state} with {self.completed[tid]} Completed")
            elif self.completed[tid]:
                self.fail(f"(a) {tid} is {t.state} but was completed")
        for ex in s.executors.values():
            if len(ex.running) > ex.capacity:
                self.fail(f"(b) {ex.node} runs {len(ex.running)} tasks in {ex.capacity} slots")
            for tid in ex.running:
                if not any(c.holds and c.node == ex.node for c in s.tasks[tid].copies):
                    self.fail(f"(b) {ex.node} lists {tid} without holding it")
        for key, tids in self.created.items():
            if len(tids) > 1:
                self.fail(f"(e) idempotency key {key} made tasks {sorted(tids)}")

    def complete(self) -> None:
        """Fault-free: everything back, answering, finishing what it runs; every task must end."""
        self.trace.append("completion")
        for node in NODES:
            self.alive[node] = True
            self.apply(self.s.undrain(node, self.now))
            self.status(node)
        for _ in range(400):
            if all(t.terminal for t in self.s.tasks.values()):
                return
            self.now += 1.0
            for node in NODES:
                self.beat(node)
            self.apply(self.s.tick(self.now))
            self.after_tick()
            for node in NODES:
                for tid in sorted(self.believes[node]):
                    attempt = self.believes[node][tid]
                    if self.holds(tid, node, attempt):
                        self.apply(self.s.started(tid, node, self.now, attempt))
                        self.reported.setdefault(tid, []).append({"v": tid})
                        self.apply(self.s.finished(tid, node, True, {"v": tid}, None, self.now, attempt))
                    else:
                        self.apply(self.s.finished(tid, node, True, {"v": tid}, None, self.now, attempt))
                    self.believes[node].pop(tid, None)
            self.check()
        live = {tid: t.state for tid, t in self.s.tasks.items() if not t.terminal}
        self.fail(f"(liveness) tasks never ended: {live}")


def run(seed: int, cls: type[Scheduler] = Scheduler) -> Sim:
    sim = Sim(seed, cls)
    for _ in range(STEPS):
        sim.step()
    sim.complete()
    return sim


#: what the random runs must have exercised, all seeds together
FEATURES = {"assign", "resumed from a checkpoint", "cancel reached a node", "other replicas cancelled",
            "stale node told to stop", "completed succeeded", "completed failed", "completed cancelled",
            "completed expired", "disagreement flagged", "no majority possible", "gave up after its attempts",
            "executor lost: silent", "executor lost: gone", "requeued: not reported", "requeued: failed",
            "requeued: draining", "requeued: lease lost", "drained", "ignored", "duplicate submission",
            "late result ignored"}


def test_random_runs_keep_every_invariant() -> None:
    seen: Counter[str] = Counter()
    tasks = 0
    for seed in range(SEEDS):
        sim = run(seed)
        seen.update(sim.seen)
        tasks += len(sim.s.tasks)
    print(f"\nscheduler model: {SEEDS} runs of {STEPS} random steps, {tasks} tasks; "
          + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    assert FEATURES <= set(seen), f"never happened: {sorted(FEATURES - set(seen))}"


# ---- mutants: the checker must catch each ---------------------------------------------------------

class _AcceptsLateResults(Scheduler):
    """Broken: a result from a node that lost the lease is taken as the current holder's."""

    def finished(self, task_id: str, node: str, ok: bool, result: Any, error: str | None, now: float,
                 attempt: int | None = None) -> list[Any]:
        task = self.tasks.get(task_id)
        if task is not None and not task.terminal and self._held(task, node) is None:
            other = next((c for c in task.copies if c.holds), None)
            if other is not None and other.node:
                return super().finished(task_id, other.node, ok, result, error, now)
        return super().finished(task_id, node, ok, result, error, now, attempt)


class _SharesExecutors(Scheduler):
    """Broken: replicas may land on an executor that already holds a copy."""

    def _place(self, task: Any, copy: Any, exclude: frozenset[str], executors: list[Any], now: float,
               avoid: bool = True) -> Any:
        return super()._place(task, copy, frozenset(), executors, now, avoid)


class _KeepsLostTasks(Scheduler):
    """Broken: an executor declared lost keeps its tasks."""

    def _lose_executor(self, ex: Any, now: float, reason: str) -> None:
        ex.live, ex.lost_at = False, now


class _NoDedup(Scheduler):
    """Broken: idempotency keys are forgotten."""

    def submit(self, task: Task, now: float) -> list[Any]:
        self._keys.clear()
        return super().submit(task, now)


@pytest.mark.parametrize("cls,expected", [(_AcceptsLateResults, "(c)"), (_SharesExecutors, "(b)"),
                                          (_KeepsLostTasks, "(f)"), (_NoDedup, "(e)")],
                         ids=["late result accepted", "replicas share an executor", "lost executor keeps its tasks",
                              "no idempotency"])
def test_mutant_is_caught(cls: type[Scheduler], expected: str) -> None:
    for seed in range(SEEDS):
        try:
            run(seed, cls)
        except Violation as exc:
            print(f"\n{cls.__name__} caught at seed {seed}: {str(exc).splitlines()[0]}")
            assert str(exc).startswith(expected), str(exc)
            return
    pytest.fail(f"{cls.__name__} was not caught in {SEEDS} runs")
