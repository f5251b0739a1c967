"""Bounded model checking of the store-and-forward custody chain, built from the real classes.

A small system (one agent, one gateway, one cloud) is explored exhaustively: breadth first, with
a visited set over a canonical, hashable state. Its moving parts are the REAL
:class:`~cwsnet.custody.SendWindow` (agent -> gateway and gateway -> cloud),
:class:`~cwsnet.custody.CustodyAcks` (the gateway's pending custody acks and busy notices) and
:func:`~cwsnet.custody.acked_seqs` / :func:`~cwsnet.custody.expand` /
:func:`~cwsnet.custody.ranges` (writing and reading ack bodies): every transition rebuilds those
objects from the state through their public API, calls them, and freezes the result (the calls
are memoised on their hashable inputs, so each distinct call reaches the real code once).

Durable state survives crashes: the agent's outbox and seq counter, the gateway's store, the
cloud's store. Volatile state does not: the agent's window, the gateway's pending custody acks and
its uplink window, the cloud's pending end-to-end acks.

Events: the agent produces a message (2 in all); its outbox overflows (the policy drops the oldest
held message); the agent and the gateway send what their window says is due; the gateway receives
a message (commits it then acks it, acks it again if already held, or refuses it with a busy
notice when its store is full); the agent reads a custody ack (deletes what it covers, pauses on
a busy notice); the cloud stores a message (once) and acks it end to end; the gateway deletes what
an end-to-end ack covers; pending acks are flushed (at once, or as a separate event in the
"batches" profiles); the clock advances one tick.

Faults, in any state and any number of times (that keeps the state space finite and smaller
than a budget would): a message in any of the four channels (agent->gateway data, gateway->agent
custody acks, gateway->cloud data, cloud->gateway end-to-end acks) is lost, duplicated (delivered
and still in flight) or delivered out of order; a link reconnects; a node crashes and restarts.
A channel is a set: a copy sent while an identical one is in flight adds nothing.

Time is relative: ``now`` is always 0 in a state, send times and the end of a pause are stored
relative to it, an overdue retransmission is clamped to "just due" and attempt counts are capped
where the backoff saturates. The real objects cannot tell the difference, and the state space is
finite without bounding the number of ticks. Ack bodies that can have no effect any more (they
cover only seqs the receiver can never hold again) are forgotten (:meth:`Model.normalize`).

Checked in every reachable state:

(a) every seq the agent deleted from its outbox (other than by overflow) is in the gateway's store
    or the cloud's store: nothing acknowledged is lost;
(b) the cloud never stores a seq twice, nor one the agent did not produce;
(c) from every state, a deterministic fault-free completion (deliver everything, flush acks, send
    what is due, let the clock run) reaches quiescence: every produced seq the overflow policy did
    not drop is in the cloud, every outbox, store, channel and pending-ack set is empty, and
    neither window still asks for a wakeup (an event loop can go idle).

Several profiles (:data:`PROFILES`) vary windows, capacities, ack batching and backoff; each is
explored exhaustively, in parallel on the machine's cores. Mutants (:data:`MUTANTS`: a broken
agent, gateway, cloud, ``SendWindow`` or ``ranges``) must each be caught, which proves that the
checker can fail. ``pytest -s`` prints the number of states per profile and each mutant's trace.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest

import cwsnet.custody as custody
from cwsnet.custody import CustodyAcks, SendWindow, acked_seqs, expand, parse_ranges, ranges

DEV = "dev-1"

Frozen = str  # an ack body frozen as canonical JSON (a str caches its hash: states hash fast)
Win = tuple[tuple[tuple[int, float, int], ...], float]  # ((seq, sent_at - now, attempts), ...), pause left


def freeze(x: Any) -> Frozen:
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def thaw(x: Frozen) -> Any:
    return json.loads(x)


@dataclass(frozen=True)
class Config:
    messages: int = 2            # the agent produces seqs 1..messages
    agent_capacity: int = 2      # outbox bound: producing into a full outbox drops the oldest held seq
    gateway_capacity: int = 1    # store bound: a new seq arriving at a full store is refused (busy)
    agent_window: int = 1
    gateway_window: int = 1
    retransmit_after: float = 1.0
    max_backoff: float = 1.0
    busy_for: float = 1.0
    # fault budgets, None: no bound (a fault then can happen in any state, any number of times)
    crashes: tuple[int | None, int | None, int | None] = (None, None, None)  # agent, gateway, cloud
    duplications: int | None = None  # deliveries that leave the message in flight
    reconnects: int | None = None    # link flaps (the agent's or the gateway's uplink), shared budget
    losses: int | None = None        # messages lost in the channels
    channel_capacity: int | None = None  # messages in flight per channel at most; more are lost
    batch_acks: tuple[bool, bool] = (False, False)  # gateway, cloud: pending acks go out in a separate flush
    #                                                (else: sent at once, right after the commit)
    # a deliberately broken node (see MUTANTS): agent_deletes_on_send, gateway_acks_before_store,
    # gateway_acks_when_full, gateway_deletes_on_forward, cloud_no_dedup
    mutation: str | None = None
    window_cls: type[SendWindow] = SendWindow

    def attempts_cap(self) -> int:
        w = SendWindow(retransmit_after=self.retransmit_after, max_backoff=self.max_backoff)
        a = 1
        while w.backoff(a) < self.max_backoff:
            a += 1
        return a


class S(NamedTuple):
    produced: int                   # durable: seqs 1..produced were produced
    outbox: frozenset[int]          # durable
    dropped: frozenset[int]         # ghost: seqs the overflow policy dropped
    awin: Win                       # volatile
    gstore: frozenset[int]          # durable
    gpend: frozenset[int]           # mutant only: received and acked, not yet committed (volatile)
    gacks: tuple[Frozen, ...]       # volatile: pending custody acks, as drained (device, body) pairs
    gwin: Win                       # volatile
    cstore: tuple[int, ...]         # durable; a multiset so that a double store shows
    cpend: frozenset[int]           # volatile: pending end-to-end acks
    # channels: messages in flight. A set: a copy sent while an identical one is in flight adds
    # nothing (as good as lost); duplication is a delivery that leaves the message in flight.
    a2g: frozenset[int]
    g2a: frozenset[Frozen]
    g2c: frozenset[int]
    c2g: frozenset[Frozen]
    budget: tuple[int, ...]  # faults left: agent/gateway/cloud crashes, duplications, reconnects, losses; -1: no bound

    def removed(self) -> frozenset[int]:
        """Ghost: the seqs the agent deleted from its outbox (other than by overflow)."""
        return frozenset(range(1, self.produced + 1)) - self.outbox - self.dropped


_FIELD = {name: i for i, name in enumerate(S._fields)}


def _replace(self: S, **changes: Any) -> S:
    """``S._replace``, twice as fast (the explorer makes millions of states)."""
    values = list(self)
    for name, value in changes.items():
        values[_FIELD[name]] = value
    return tuple.__new__(S, values)


S._replace = _replace  # type: ignore[method-assign]

CHANNELS = ("a2g", "g2a", "g2c", "c2g")
EMPTY_WIN: Win = ((), 0.0)
NONE: frozenset = frozenset()


def initial(cfg: Config) -> S:
    return S(0, NONE, NONE, EMPTY_WIN, NONE, NONE, (), EMPTY_WIN, (), NONE, NONE, NONE, NONE, NONE,
             tuple(-1 if n is None else n for n in (*cfg.crashes, cfg.duplications, cfg.reconnects, cfg.losses)))


def spend(budget: tuple[int, ...], i: int) -> tuple[int, ...] | None:
    """The budget after one fault of kind ``i``; None if none is left."""
    if budget[i] < 0:
        return budget
    if budget[i] == 0:
        return None
    return (*budget[:i], budget[i] - 1, *budget[i + 1:])


class Model:
    """Transitions of the system. Each rebuilds the real objects from the frozen state, calls them
    and freezes the result; the calls are memoised on their (hashable) inputs, so each distinct
    call reaches the real code once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cap = cfg.attempts_cap()
        self.pulled_in = False
        w = SendWindow(retransmit_after=cfg.retransmit_after, max_backoff=cfg.max_backoff)
        self.backoff = {a: w.backoff(a) for a in range(1, self.cap + 1)}
        for name in ("win_due", "win_sent", "win_acked", "win_tick", "win_reconnected", "win_forget",
                     "win_wakeup", "acks_receive", "acks_flush", "read_ack", "cover", "live_agent", "prune_custody",
                     "prune_e2e", "prune_pending", "prune_data", "e2e_body", "pruned"):
            setattr(self, name, functools.cache(getattr(self, name)))

    # ---- real objects <-> frozen state ----------------------------------------------------------
    def window(self, frozen: Win, size: int) -> SendWindow:
        cfg = self.cfg
        w = cfg.window_cls(window=size, retransmit_after=cfg.retransmit_after, max_backoff=cfg.max_backoff)
        flights, paused = frozen
        for seq, rel, attempts in flights:
            for _ in range(attempts):
                w.sent([seq], rel)
        w.paused_until = paused  # (not pause(): that would also pull in the timers just rebuilt)
        return w

    def freeze_window(self, w: SendWindow, now: float = 0.0) -> Win:
        flights = []
        for seq, f in w.inflight.items():
            attempts = min(f.attempts, self.cap)  # the backoff is saturated from here on
            b = w.backoff(attempts)
            rel = f.sent_at - now
            if rel + b <= 0:
                rel = -b  # overdue (or sent_at = -inf after a reconnect): all the same from now on
            flights.append((seq, float(rel), attempts))
        return tuple(sorted(flights)), max(0.0, w.paused_until - now)

    def acks(self, frozen: tuple[Frozen, ...]) -> CustodyAcks:
        a = CustodyAcks(busy_for=self.cfg.busy_for)
        for fb in frozen:
            device, body = thaw(fb)
            a.put_back(device, body)
        return a

    @staticmethod
    def freeze_acks(a: CustodyAcks) -> tuple[Frozen, ...]:
        return tuple(freeze([device, body]) for device, body in a.drain())

    # ---- memoised calls into the real code (inputs and outputs hashable) ------------------------
    def win_due(self, frozen: Win, size: int, held: frozenset[int]) -> tuple[int, ...]:
        return tuple(self.window(frozen, size).due(sorted(held), 0.0))

    def win_sent(self, frozen: Win, size: int, seqs: tuple[int, ...]) -> Win:
        w = self.window(frozen, size)
        w.sent(seqs, 0.0)
        return self.freeze_window(w)

    def win_acked(self, frozen: Win, size: int, seqs: tuple[int, ...], pause: float | None) -> Win:
        w = self.window(frozen, size)
        w.acked(seqs)
        if pause is None:
            return self.freeze_window(w)
        before = self.freeze_window(w)[0]
        w.pause(0.0, pause)
        after = self.freeze_window(w)
        self.pulled_in |= after[0] != before  # the pause brought a retransmission forward
        return after

    def win_tick(self, frozen: Win, size: int) -> Win:
        return self.freeze_window(self.window(frozen, size), now=1.0)

    def win_reconnected(self, frozen: Win, size: int) -> Win:
        w = self.window(frozen, size)
        w.reconnected()
        return self.freeze_window(w)

    def win_forget(self, frozen: Win, size: int, keep: frozenset[int]) -> Win:
        w = self.window(frozen, size)
        w.forget(keep)
        return self.freeze_window(w)

    def win_wakeup(self, frozen: Win, size: int) -> float | None:
        return self.window(frozen, size).next_wakeup(0.0)

    def acks_receive(self, frozen: tuple[Frozen, ...], seq: int, stored: bool) -> tuple[Frozen, ...]:
        a = self.acks(frozen)
        if stored:
            a.stored(DEV, seq)
        else:
            a.refused(DEV)
        return self.freeze_acks(a)

    def acks_flush(self, frozen: tuple[Frozen, ...]) -> frozenset[Frozen]:
        a = self.acks(frozen)
        bodies = frozenset(freeze(body) for device, body in a.drain() if device == DEV)
        assert not a
        return bodies

    def read_ack(self, fb: Frozen) -> tuple[tuple[tuple[int, int], ...], float | None]:
        rs, pause = acked_seqs(thaw(fb), DEV)
        return tuple(rs), pause

    def cover(self, rs: tuple[tuple[int, int], ...], held: frozenset[int]) -> tuple[int, ...]:
        return tuple(expand(rs, sorted(held)))

    def put(self, ch: frozenset, items: Iterable) -> frozenset:
        """Send into a channel: what finds it full (``channel_capacity`` messages) is lost."""
        cap = self.cfg.channel_capacity
        for item in items:
            if cap is None or len(ch) < cap or item in ch:
                ch = ch | {item}
        return ch

    # ---- the nodes' handlers -------------------------------------------------------------------
    def produce(self, s: S) -> S:
        cfg = self.cfg
        seq = s.produced + 1
        outbox, dropped, awin = s.outbox, s.dropped, s.awin
        if len(outbox) >= cfg.agent_capacity:  # overflow policy: drop the oldest held message
            oldest = min(outbox)
            outbox, dropped = outbox - {oldest}, dropped | {oldest}
            awin = self.win_forget(awin, cfg.agent_window, outbox)
        return s._replace(produced=seq, outbox=outbox | {seq}, dropped=dropped, awin=awin)

    def agent_send(self, s: S, seqs: tuple[int, ...]) -> S:
        s = s._replace(awin=self.win_sent(s.awin, self.cfg.agent_window, seqs), a2g=self.put(s.a2g, seqs))
        if self.cfg.mutation == "agent_deletes_on_send":
            s = s._replace(outbox=s.outbox - set(seqs))
        return s

    def agent_ack(self, s: S, fb: Frozen) -> S:
        rs, pause = self.read_ack(fb)
        done = self.cover(rs, s.outbox)
        return s._replace(outbox=s.outbox - set(done), awin=self.win_acked(s.awin, self.cfg.agent_window, done, pause))

    def gateway_receive(self, s: S, seq: int) -> S:
        s = self._gateway_receive(s, seq)
        return s if self.cfg.batch_acks[0] else self.gateway_flush(s)

    def _gateway_receive(self, s: S, seq: int) -> S:
        mutation = self.cfg.mutation
        if mutation == "gateway_acks_before_store":
            # acked at once, committed by a later "commit" event
            return s._replace(gpend=s.gpend | {seq}, gacks=self.acks_receive(s.gacks, seq, True))
        if seq in s.gstore:  # already held: ack it again (the agent lost the first ack)
            return s._replace(gacks=self.acks_receive(s.gacks, seq, True))
        if len(s.gstore) < self.cfg.gateway_capacity:  # committed first, then acknowledged
            return s._replace(gstore=s.gstore | {seq}, gacks=self.acks_receive(s.gacks, seq, True))
        return s._replace(gacks=self.acks_receive(s.gacks, seq, mutation == "gateway_acks_when_full"))

    def gateway_commit(self, s: S) -> S:  # mutant only
        room = self.cfg.gateway_capacity - len(s.gstore)
        return s._replace(gstore=s.gstore | set(sorted(s.gpend - s.gstore)[:max(room, 0)]), gpend=NONE)

    def gateway_flush(self, s: S) -> S:
        return s._replace(gacks=(), g2a=self.put(s.g2a, sorted(self.acks_flush(s.gacks))))

    def gateway_send(self, s: S, seqs: tuple[int, ...]) -> S:
        s = s._replace(gwin=self.win_sent(s.gwin, self.cfg.gateway_window, seqs), g2c=self.put(s.g2c, seqs))
        if self.cfg.mutation == "gateway_deletes_on_forward":
            s = s._replace(gstore=s.gstore - set(seqs))
        return s

    def gateway_e2e_ack(self, s: S, fb: Frozen) -> S:
        rs, _ = self.read_ack(fb)
        done = self.cover(rs, s.gstore)
        return s._replace(gstore=s.gstore - set(done), gwin=self.win_acked(s.gwin, self.cfg.gateway_window, done, None))

    def cloud_receive(self, s: S, seq: int) -> S:
        cstore = s.cstore
        if seq not in cstore or self.cfg.mutation == "cloud_no_dedup":  # store, then owe an ack
            cstore = tuple(sorted((*cstore, seq)))
        s = s._replace(cstore=cstore, cpend=s.cpend | {seq})
        return s if self.cfg.batch_acks[1] else self.cloud_flush(s)

    def cloud_flush(self, s: S) -> S:
        return s._replace(cpend=NONE, c2g=self.put(s.c2g, [self.e2e_body(s.cpend)]))

    def e2e_body(self, seqs: frozenset[int]) -> Frozen:
        return freeze({"acks": [[DEV, first, last] for first, last in ranges(seqs)]})

    def tick(self, s: S) -> S:
        return s._replace(awin=self.win_tick(s.awin, self.cfg.agent_window),
                          gwin=self.win_tick(s.gwin, self.cfg.gateway_window))

    def reconnect(self, s: S, agent: bool, b: tuple[int, ...]) -> S:
        if agent:
            return s._replace(awin=self.win_reconnected(s.awin, self.cfg.agent_window), budget=b)
        return s._replace(gwin=self.win_reconnected(s.gwin, self.cfg.gateway_window), budget=b)

    def crash(self, s: S, node: int, b: tuple[int, ...]) -> S:
        if node == 0:  # agent: a fresh window; the outbox and the seq counter are durable
            return s._replace(awin=EMPTY_WIN, budget=b)
        if node == 1:  # gateway: pending custody acks, uncommitted messages and the uplink window lost
            return s._replace(gacks=(), gpend=NONE, gwin=EMPTY_WIN, budget=b)
        return s._replace(cpend=NONE, budget=b)  # cloud: pending end-to-end acks lost

    def normalize(self, s: S) -> S:
        """Forget what can have no effect, now or ever: an ack in flight or pending that covers no
        seq the receiver holds or could hold again (the agent's outbox never gets a seq back; the
        gateway can get one back only from the agent or from the agent->gateway channel), and a
        data message in flight to the cloud that the cloud already stores and whose ack could not
        matter. States with and without such a message have the same futures (the same events
        enabled, with the same effects on everything else), so the explorer keeps one of them."""
        if not (s.g2a or s.c2g or s.gacks or s.cpend or s.g2c):
            return s
        new = self.pruned(s.produced, s.outbox, s.gstore, s.gpend, s.a2g, s.g2a, s.c2g, s.gacks, s.cpend, s.g2c,
                          s.cstore)
        return s if new is None else s._replace(g2a=new[0], c2g=new[1], gacks=new[2], cpend=new[3], g2c=new[4])

    def pruned(self, produced: int, outbox: frozenset[int], gstore: frozenset[int], gpend: frozenset[int],
               a2g: frozenset[int], g2a: frozenset[Frozen], c2g: frozenset[Frozen], gacks: tuple[Frozen, ...],
               cpend: frozenset[int], g2c: frozenset[int], cstore: tuple[int, ...]) -> tuple | None:
        live_agent = self.live_agent(produced, outbox)
        live_gateway = gstore | gpend | a2g | live_agent
        new = (self.prune_custody(g2a, live_agent), self.prune_e2e(c2g, live_gateway),
               self.prune_pending(gacks, live_agent), cpend & live_gateway,
               g2c if self.cfg.mutation == "cloud_no_dedup" else self.prune_data(g2c, live_gateway, cstore))
        return None if new == (g2a, c2g, gacks, cpend, g2c) else new

    def live_agent(self, produced: int, outbox: frozenset[int]) -> frozenset[int]:
        return outbox | frozenset(range(produced + 1, self.cfg.messages + 1))

    def prune_custody(self, ch: frozenset[Frozen], live: frozenset[int]) -> frozenset[Frozen]:
        out = set()
        for fb in ch:  # each body reduced to the live seqs it covers (and its busy notice, if any)
            rs, pause = self.read_ack(fb)
            seqs = self.cover(rs, live)
            if seqs or pause is not None:
                a = CustodyAcks(busy_for=pause or 0.0)
                for seq in seqs:
                    a.stored(DEV, seq)
                if pause is not None:
                    a.refused(DEV)
                out.update(freeze(body) for _, body in a.drain())
        return frozenset(out)

    def prune_e2e(self, ch: frozenset[Frozen], live: frozenset[int]) -> frozenset[Frozen]:
        return frozenset(fb for fb in ch if self.cover(self.read_ack(fb)[0], live))

    def prune_pending(self, frozen: tuple[Frozen, ...], live: frozenset[int]) -> tuple[Frozen, ...]:
        a = CustodyAcks(busy_for=self.cfg.busy_for)
        for fb in frozen:
            device, body = thaw(fb)
            for seq in expand(parse_ranges(body["custody"]), sorted(live)):
                a.stored(device, seq)
            if "busy" in body:
                a.refused(device)
        return self.freeze_acks(a)

    @staticmethod
    def prune_data(ch: frozenset[int], live: frozenset[int], cstore: tuple[int, ...]) -> frozenset[int]:
        return frozenset(seq for seq in ch if seq in live or seq not in cstore)

    DELIVER: dict[str, str] = {"a2g": "gateway_receive", "g2a": "agent_ack", "g2c": "cloud_receive",
                               "c2g": "gateway_e2e_ack"}

    def deliver(self, s: S, name: str, item: Any) -> S:
        return getattr(self, self.DELIVER[name])(s, item)

    # ---- the explorer's moves ------------------------------------------------------------------
    def successors(self, s: S) -> Iterator[tuple[str, S]]:
        normalize = self.normalize
        return ((label, normalize(t)) for label, t in self._successors(s))

    def _successors(self, s: S) -> Iterator[tuple[str, S]]:
        cfg = self.cfg
        if s.produced < cfg.messages:
            yield "produce", self.produce(s)
        seqs = self.win_due(s.awin, cfg.agent_window, s.outbox)
        if seqs:
            yield "agent_send", self.agent_send(s, seqs)
        seqs = self.win_due(s.gwin, cfg.gateway_window, s.gstore)
        if seqs:
            yield "gateway_send", self.gateway_send(s, seqs)
        if s.gpend:
            yield "gateway_commit", self.gateway_commit(s)
        if s.gacks:
            yield "gateway_flush", self.gateway_flush(s)
        if s.cpend:
            yield "cloud_flush", self.cloud_flush(s)
        t = self.tick(s)
        if t != s:
            yield "tick", t
        dup, loss, flap = spend(s.budget, 3), spend(s.budget, 5), spend(s.budget, 4)
        for name in CHANNELS:
            ch = getattr(s, name)
            for item in ch:
                rest = s._replace(**{name: ch - {item}})
                yield self.DELIVER[name], self.deliver(rest, name, item)
                if dup is not None:  # duplication: delivered, and still in flight
                    yield f"dup_{name}", self.deliver(s if dup is s.budget else s._replace(budget=dup), name, item)
                if loss is not None:
                    yield f"drop_{name}", rest if loss is s.budget else rest._replace(budget=loss)
        # (a reconnect or a crash that would change nothing is not generated: it adds no state)
        if flap is not None:
            if s.awin != EMPTY_WIN:
                yield "reconnect_agent", self.reconnect(s, True, flap)
            if s.gwin != EMPTY_WIN:
                yield "reconnect_gateway", self.reconnect(s, False, flap)
        volatile = (s.awin != EMPTY_WIN, bool(s.gacks or s.gpend or s.gwin != EMPTY_WIN), bool(s.cpend))
        for node, name in enumerate(("agent", "gateway", "cloud")):
            b = spend(s.budget, node)
            if b is not None and (volatile[node] or b != s.budget):
                yield f"crash_{name}", self.crash(s, node, b)

    def fault_free_step(self, s: S) -> tuple[str, S] | None:
        """One step of the deterministic, fault-free completion (None: nothing left to do)."""
        step = self._fault_free_step(s)
        return None if step is None else (step[0], self.normalize(step[1]))

    def _fault_free_step(self, s: S) -> tuple[str, S] | None:
        cfg = self.cfg
        for name in CHANNELS:  # (channels empty before anything is sent: none overflows)
            ch = getattr(s, name)
            if ch:
                item = min(ch, key=repr)
                return self.DELIVER[name], self.deliver(s._replace(**{name: ch - {item}}), name, item)
        if s.gpend:
            return "gateway_commit", self.gateway_commit(s)
        if s.gacks:
            return "gateway_flush", self.gateway_flush(s)
        if s.cpend:
            return "cloud_flush", self.cloud_flush(s)
        seqs = self.win_due(s.awin, cfg.agent_window, s.outbox)
        if seqs:
            return "agent_send", self.agent_send(s, seqs)
        seqs = self.win_due(s.gwin, cfg.gateway_window, s.gstore)
        if seqs:
            return "gateway_send", self.gateway_send(s, seqs)
        t = self.tick(s)
        if t != s:
            return "tick", t
        return None

    # ---- properties ----------------------------------------------------------------------------
    def safety(self, s: S) -> str | None:
        lost = s.removed() - s.gstore - set(s.cstore)
        if lost:
            return f"(a) acknowledged seqs {sorted(lost)} are in neither the gateway's nor the cloud's store"
        if len(set(s.cstore)) != len(s.cstore):
            return f"(b) the cloud stored a seq more than once: {s.cstore}"
        alien = sorted(seq for seq in s.cstore if not 1 <= seq <= s.produced)
        if alien:
            return f"(b) the cloud stored seqs {alien} the agent never produced"
        return None

    def quiescent(self, s: S) -> bool:
        if s.outbox or s.gstore or s.gpend or s.gacks or s.cpend or s.a2g or s.g2a or s.g2c or s.c2g:
            return False
        if not set(range(1, s.produced + 1)) - s.dropped <= set(s.cstore):
            return False
        # an event loop must be able to go idle: neither window may still want a wakeup
        return (self.win_wakeup(s.awin, self.cfg.agent_window) is None
                and self.win_wakeup(s.gwin, self.cfg.gateway_window) is None)

    def features(self, s: S) -> Iterator[str]:
        """What a state shows, to prove that the bounds reach the interesting situations."""
        if any(self.read_ack(fb)[1] is not None for fb in s.g2a):
            yield "busy notice in flight"
        if s.awin[1] > 0:
            yield "agent paused"
        if any(len(self.cover(self.read_ack(fb)[0], frozenset(range(1, s.produced + 1)))) > 1 for fb in s.g2a):
            yield "one custody ack for several seqs"
        if any(self.read_ack(fb)[1] is not None and self.read_ack(fb)[0] for fb in s.g2a):
            yield "busy notice with custody acks"
        if len(s.awin[0]) > 1:
            yield "several seqs in flight"
        if any(rel + self.backoff[a] <= 0 for _, rel, a in s.awin[0] + s.gwin[0]):
            yield "retransmission due"
        if any(rel + self.backoff[a] > 1 for _, rel, a in s.awin[0] + s.gwin[0]):
            yield "backed off beyond one tick"
        if len(s.gstore) >= self.cfg.gateway_capacity:
            yield "gateway store full"
        if len(s.gstore) > 1:
            yield "gateway holds several seqs"
        if s.dropped:
            yield "overflow drop"
        if s.gstore & set(s.cstore):
            yield "gateway holds a seq the cloud has"
        if s.produced == self.cfg.messages and self.quiescent(s):
            yield "all delivered"


@dataclass
class Result:
    states: int = 0
    transitions: int = 0
    completion_steps: int = 0
    violation: str | None = None
    trace: list[str] = field(default_factory=list)
    events: set[str] = field(default_factory=set)
    features: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def explore(cfg: Config, *, max_completion: int = 500) -> Result:
    """Breadth first over every reachable state; stops at the first violated property, with the
    shortest trace that reaches it (the fault-free completion's steps after ``--completion--``)."""
    t0 = time.perf_counter()
    m = Model(cfg)
    res = Result()
    init = initial(cfg)
    parent: dict[S, tuple[S, str] | None] = {init: None}
    live: set[S] = set()  # states whose fault-free completion is known to reach quiescence
    queue = deque([init])
    transitions, events = 0, set()

    def fail(s: S, why: str, tail: list[str]) -> Result:
        trace = list(tail)
        while (p := parent[s]) is not None:
            s, label = p
            trace.insert(0, label)
        res.violation, res.trace, res.states = why, trace, len(parent)
        res.seconds = time.perf_counter() - t0
        return res

    while queue:
        s = queue.popleft()
        why = m.safety(s)
        if why:
            return fail(s, why, [])
        res.features.update(m.features(s))
        # (c) the deterministic fault-free completion, memoised: a state on a completed path is live
        path: list[S] = []
        on_path: set[S] = set()
        labels = ["--completion--"]
        cur = s
        while cur not in live and not m.quiescent(cur):
            if cur in on_path or len(path) >= max_completion:
                return fail(s, f"(c) the fault-free completion loops, never quiescent: {cur}", labels)
            path.append(cur)
            on_path.add(cur)
            step = m.fault_free_step(cur)
            if step is None:
                return fail(s, f"(c) the fault-free completion gets stuck short of quiescence: {cur}", labels)
            labels.append(step[0])
            cur = step[1]
            res.completion_steps += 1
            why = m.safety(cur)
            if why:
                return fail(s, why, labels)
        live.update(path)
        for label, t in m.successors(s):
            transitions += 1
            events.add(label)
            n = len(parent)
            parent.setdefault(t, (s, label))  # (one hash of t, not two)
            if len(parent) > n:
                queue.append(t)
    res.states, res.transitions, res.events = len(parent), transitions, events
    if m.pulled_in:
        res.features["a pause brought a retransmission forward"] += 1
    res.seconds = time.perf_counter() - t0
    return res


# ---- the profiles explored, each exhaustively -----------------------------------------------------

# (a cloud that acks at once holds nothing volatile: its crash is then the loss of an ack, and no
# crash_cloud event is generated; the profile where the cloud batches its acks has them)
ALL_FAULTS = {"drop_a2g", "drop_g2a", "drop_g2c", "drop_c2g", "dup_a2g", "dup_g2a", "dup_g2c", "dup_c2g",
              "reconnect_agent", "reconnect_gateway", "crash_agent", "crash_gateway"}
BASE_EVENTS = {"produce", "agent_send", "agent_ack", "gateway_receive", "gateway_send", "gateway_e2e_ack",
               "cloud_receive", "tick"} | ALL_FAULTS
BASE_FEATURES = {"busy notice in flight", "agent paused", "retransmission due", "gateway store full",
                 "gateway holds a seq the cloud has", "all delivered"}

#: name -> (config, events that must occur, features that must be seen); the longest first, so
#: that the parallel runs end together
PROFILES: dict[str, tuple[Config, set[str], set[str]]] = {
    # custody acks pile up in CustodyAcks and go out in a separate flush (a crash may come between)
    "gateway batches custody acks": (Config(batch_acks=(True, False)), BASE_EVENTS | {"gateway_flush"},
                                     BASE_FEATURES),
    # end-to-end acks pile up at the cloud and go out in a separate flush (a crash may come between)
    "cloud batches end-to-end acks": (Config(batch_acks=(False, True)), BASE_EVENTS | {"cloud_flush", "crash_cloud"},
                                      BASE_FEATURES),
    # both messages in flight at once on the agent's hop
    "agent window 2": (Config(agent_window=2), BASE_EVENTS, BASE_FEATURES | {"several seqs in flight"}),
    # custody acks batched with both messages in flight, so that one ack covers both or a busy
    # notice comes with acks (a channel holds 1 message: one sent while another is in flight is lost)
    "gateway batches custody acks, agent window 2": (
        Config(batch_acks=(True, False), agent_window=2, channel_capacity=1), BASE_EVENTS | {"gateway_flush"},
        BASE_FEATURES | {"one custody ack for several seqs", "busy notice with custody acks"}),
    # retransmissions back off to 2 ticks, a busy notice pauses for 1 (and brings them forward)
    "doubling backoff": (Config(max_backoff=2.0), BASE_EVENTS,
                         BASE_FEATURES | {"backed off beyond one tick", "a pause brought a retransmission forward"}),
    # the outbox holds 1 message: producing the 2nd drops the 1st (forget() keeps the window true)
    "agent outbox overflow": (Config(agent_capacity=1), BASE_EVENTS, BASE_FEATURES | {"overflow drop"}),
    # 2 messages, a 1-message window on each hop, a gateway with room for 1 (so busy + pause)
    "base": (Config(), BASE_EVENTS, BASE_FEATURES),
    # the gateway holds both messages, 2 in flight to the cloud (never full: no busy here)
    "gateway window 2": (Config(gateway_capacity=2, gateway_window=2), BASE_EVENTS,
                         {"retransmission due", "gateway holds several seqs", "all delivered"}),
}


def _explore_profile(name: str) -> Result:
    return explore(PROFILES[name][0])


@pytest.fixture(scope="module")
def explored() -> dict[str, Result]:
    """Every profile's exploration, run in parallel on the machine's cores (forked: the children
    inherit this module; not while other threads run, which a fork could catch holding a lock),
    else one after the other."""
    names = list(PROFILES)
    workers = min(len(names), os.cpu_count() or 1)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return dict(zip(names, pool.map(_explore_profile, names), strict=True))
    return {name: _explore_profile(name) for name in names}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_exhaustive_exploration_finds_no_violation(profile: str, explored: dict[str, Result]) -> None:
    res = explored[profile]
    print(f"\ncustody model [{profile}]: {res.states} states, {res.transitions} transitions, "
          f"{res.completion_steps} completion steps, {res.seconds:.1f} s")
    assert res.violation is None, f"{res.violation}\ntrace: {res.trace}"
    _, events, features = PROFILES[profile]
    assert events <= res.events, f"never happened: {sorted(events - res.events)}"
    assert features <= set(res.features), f"never seen: {sorted(features - set(res.features))}"


def test_freeze_roundtrips() -> None:
    m = Model(Config(max_backoff=2.0, busy_for=2.0))
    w = SendWindow(window=2, retransmit_after=1.0, max_backoff=2.0)
    w.pause(0.0, 1.5)
    w.sent([1, 2], 0.0)
    w.sent([1], 0.0)
    frozen = m.freeze_window(w)
    assert frozen == (((1, 0.0, 2), (2, 0.0, 1)), 1.5)
    assert m.freeze_window(m.window(frozen, 2)) == frozen
    # one tick later seq 2 (backoff 1) is due, seq 1 (backoff 2) is not; the pause has 0.5 left
    assert m.freeze_window(m.window(frozen, 2), now=1.0) == (((1, -1.0, 2), (2, -1.0, 1)), 0.5)
    # a third attempt backs off no longer than the second: the count is capped where it saturates
    w.sent([1], 0.0)
    assert m.freeze_window(w)[0][0] == (1, 0.0, 2)
    w.reconnected()
    assert m.freeze_window(w) == (((1, -2.0, 2), (2, -1.0, 1)), 0.0)
    assert m.window(m.freeze_window(w), 2).due([1, 2, 3], 0.0) == [1, 2]
    a = CustodyAcks(busy_for=2.0)
    a.stored(DEV, 1)
    a.stored(DEV, 2)
    a.refused(DEV)
    fa = Model.freeze_acks(a)
    assert [thaw(x) for x in fa] == [[DEV, {"busy": 2.0, "custody": [[1, 2]]}]]
    assert Model.freeze_acks(m.acks(fa)) == fa
    assert m.prune_pending(fa, frozenset({2})) == (freeze([DEV, {"custody": [[2, 2]], "busy": 2.0}]),)


def test_a_hand_checked_run_refused_then_delivered() -> None:
    """A hand-checked run: produce both, the gateway (room for 1) takes seq 1 and refuses seq 2
    with a busy notice; the fault-free completion then delivers both to the cloud."""
    m = Model(Config(agent_window=2))
    s = initial(m.cfg)
    s = m.produce(m.produce(s))
    s = m.agent_send(s, m.win_due(s.awin, 2, s.outbox))
    assert s.a2g == {1, 2}
    s = m.normalize(m.gateway_receive(s._replace(a2g=frozenset({2})), 1))
    s = m.normalize(m.gateway_receive(s._replace(a2g=frozenset()), 2))
    assert s.gstore == {1}
    assert {thaw(fb)["custody"] == [] and thaw(fb).get("busy") for fb in s.g2a} == {False, 1.0}
    labels = []
    while not m.quiescent(s):
        step = m.fault_free_step(s)
        assert step is not None
        labels.append(step[0])
        s = step[1]
        assert m.safety(s) is None
    assert s.cstore == (1, 2) and labels.count("tick") >= 1


class _NoRetransmitWindow(SendWindow):
    """Broken: never re-sends what is in flight."""

    def due(self, held: Iterable[int], now: float) -> list[int]:
        return [s for s in super().due(held, now) if s not in self.inflight]


class _NoForgetWindow(SendWindow):
    """Broken: ``forget()`` keeps the seqs the outbox dropped in flight (they hold the window)."""

    def forget(self, keep: Iterable[int]) -> None:
        pass


class _NoAckedWindow(SendWindow):
    """Broken: ``acked()`` keeps acknowledged seqs in flight."""

    def acked(self, seqs: Iterable[int]) -> None:
        pass


def _ranges_one_too_far(seqs: Iterable[int]) -> list[list[int]]:
    """Broken ``ranges``: the last range runs one seq too far (``{1}`` -> ``[[1, 2]]``)."""
    out = ranges(seqs)
    if out:
        out[-1][1] += 1
    return out


MUTANTS: list[tuple[str, Config, str, Callable[[pytest.MonkeyPatch], None] | None]] = [
    ("agent deletes on transport send", Config(mutation="agent_deletes_on_send"), "(a)", None),
    ("gateway acks before storing", Config(mutation="gateway_acks_before_store"), "(a)", None),
    ("gateway acks what it refused", Config(mutation="gateway_acks_when_full"), "(a)", None),
    ("gateway deletes when forwarding", Config(mutation="gateway_deletes_on_forward"), "(a)", None),
    ("cloud without dedup", Config(mutation="cloud_no_dedup"), "(b)", None),
    ("agent never retransmits", Config(window_cls=_NoRetransmitWindow), "(c)", None),
    ("SendWindow.forget() forgets nothing", Config(agent_capacity=1, window_cls=_NoForgetWindow), "(c)", None),
    ("SendWindow.acked() forgets nothing", Config(window_cls=_NoAckedWindow), "(c)", None),
    ("ranges() one seq too far", Config(), "(a)", lambda mp: mp.setattr(custody, "ranges", _ranges_one_too_far)),
]


@pytest.mark.parametrize(("cfg", "expected", "patch"), [m[1:] for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(cfg: Config, expected: str, patch: Callable[[pytest.MonkeyPatch], None] | None,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    if patch is not None:
        patch(monkeypatch)
    res = explore(cfg)
    print(f"\n{res.violation} after {res.states} states\ntrace: {res.trace}")
    assert res.violation is not None and res.violation.startswith(expected), res.violation
