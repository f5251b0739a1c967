"""The ESP32 agent: WiFi, MQTT, sealed status/telemetry, a flash buffer, custody acks, tasks, OTA.

One asyncio program (``Agent.run``). Everything it sends is sealed to the cloud (docs/protocol.md
§2) with the shared keys computed once at boot; telemetry, events and task results go through
the flash buffer (``cws.buffer``) and leave it only when the gateway's custody ack (or, for a
device without a gateway, the cloud's end-to-end ack) names their ``seq`` (§5). Statuses are not
buffered: the next one supersedes them.

The network sits behind ``network`` (WiFi) and ``MQTTClient.open_stream`` (sockets), so the
MicroPython unix port runs this file unchanged against real brokers in the tests.
"""

import asyncio
import gc
import json
import sys

from cws import envelope
from cws.buffer import Buffer, SeqMark
from cws.compat import CLOCK_SET_MS, clock_is_set, heap, now_ms, sleep_ms, ticks_add, ticks_diff, ticks_ms, wait_for_ms
from cws.mqtt import MQTTClient, MQTTError

try:
    from cws.version import VERSION
except ImportError:  # running from source, not a `cwsnet firmware build`
    from cws import __version__ as VERSION  # noqa: N812

CLS_TELEMETRY, CLS_EVENT, CLS_RESULT, CLS_OTHER = 0, 1, 2, 3


def glob(p, s):
    """Shell-style match with ``*`` and ``?`` (route patterns), in linear time."""
    i = j = 0
    star = -1
    mark = 0
    while j < len(s):
        if i < len(p) and p[i] in ("?", s[j]):
            i += 1
            j += 1
        elif i < len(p) and p[i] == "*":
            star, mark = i, j
            i += 1
        elif star >= 0:
            i, mark = star + 1, mark + 1
            j = mark
        else:
            return False
    while i < len(p) and p[i] == "*":
        i += 1
    return i == len(p)


def routes_ok(r):
    """A route table as protocol §9 says: [[pattern, "gateway" | "cloud"], ...], at most 64 entries."""
    if not isinstance(r, list) or len(r) > 64:
        return False
    for e in r:
        if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and len(e[0]) <= 63
                and e[1] in ("gateway", "cloud")):
            return False
    return True


def log(*args):
    print("[%d]" % (ticks_ms() // 1000), *args)


class ReplayWindow:
    """The last 1,024 ``seq``s accepted from one sender (docs/protocol.md §2, check 8)."""

    SIZE = 1024

    def __init__(self):
        self.top = -1
        self.bits = 0  # bit i: top - i was seen

    def check(self, seq):
        """True (and remembered) if ``seq`` is new, False for a replay or one too old to judge."""
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.SIZE) - 1) if shift < self.SIZE else 1
            self.top = seq
            return True
        age = self.top - seq
        if age >= self.SIZE or self.bits >> age & 1:
            return False
        self.bits |= 1 << age
        return True


class Agent:
    def __init__(self, settings, hw=None, sensors=None, handlers=None, state_dir="cwsnet/state"):
        s = self.s = settings
        self.hw = hw
        self.state_dir = state_dir
        self.k_cloud, self.k_gw = s.k_cloud, s.k_gw
        self.base = "cws/v1/%s/%s/" % (s.site, s.node)
        self.buf = Buffer("cwsnet/buf", s.segment_bytes, s.max_segments)
        self.mark = SeqMark(state_dir + "/seq")
        self.sensors = sensors or []
        self.handlers = handlers if handlers is not None else {}
        self.batches = {}  # stream -> [readings], [first reading ticks]
        self.inflight = {}  # seq -> [sent ticks, attempts]
        self.replay = ReplayWindow()
        self.busy_until = None
        self.refused = []  # (first, last) seqs the gateway refused for lack of room, until the pause ends
        self.storage_error = None
        self.unstored = {}  # class -> messages the flash would not take
        self.wake = asyncio.Event()
        self.healthy = asyncio.Event()  # set when the gateway (or cloud) acks a message of this run
        self.run_first_seq = None
        self.started = ticks_ms()
        self._uptime_ms, self._uptime_at = 0, self.started
        self.stats = {"connects": 0, "sensor_errors": 0, "rejected": 0, "sent": 0, "acked": 0}
        self.mqtt = MQTTClient(s.node, s.host, s.port, s.username, s.password, s.keepalive,
                               ssl_ctx=s.ssl_ctx, on_message=self.on_message,
                               retransmit_ms=int(s.retransmit * 1000), max_packet=s.max_packet,
                               on_oversize=self.on_oversize)
        self.tasks = None  # cws.tasks.TaskRunner, set by the app
        self.ota = None  # cws.ota.Updater, set by the app
        self.routes = [0, []]  # [gateway seq, [[stream pattern, "gateway"|"cloud"], ...]] (protocol §9)
        try:
            with open(state_dir + "/routes") as f:
                r = json.loads(f.read())
            if isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and routes_ok(r[1]):
                self.routes = r
        except (OSError, ValueError):
            pass

    # ---- clocks ------------------------------------------------------------------------------
    def uptime_ms(self):
        """Milliseconds since boot, correct past ticks_ms's wrap (about 12 days on an ESP32)."""
        now = ticks_ms()
        self._uptime_ms += ticks_diff(now, self._uptime_at)
        self._uptime_at = now
        return self._uptime_ms

    # ---- sealing -----------------------------------------------------------------------------
    def seal(self, channel, kind, body, to="cloud", seq=None):
        """Seal ``body`` on ``cws/v1/{site}/{node}/{channel}``; returns (topic, seq, payload)."""
        topic = self.base + channel
        if seq is None:
            seq = self.mark.next(now_ms())
        if self.run_first_seq is None:
            self.run_first_seq = seq
        header = {"from": self.s.node, "to": to, "seq": seq, "ts": now_ms(), "kind": kind, "kv": self.s.kv}
        key = self.k_cloud if to == "cloud" else self.k_gw
        return topic, seq, envelope.seal(topic, header, body, key)

    def store(self, channel, kind, body, cls):
        """Seal and put in the flash buffer; the sender takes it from there.

        A flash that refuses the write (full, worn out) or a message too big for a segment costs
        that message, counted in ``dropped`` and reported in ``storage``: never the agent.
        """
        seq = None
        to = "cloud"
        if kind == "telemetry" and self.s.gateway:
            for p, where in self.routes[1]:
                if glob(p, body["stream"]):
                    to = self.s.gateway if where == "gateway" else "cloud"
                    break
        try:
            topic, seq, payload = self.seal(channel, kind, body, to)  # (the seq mark is on flash too)
            self.buf.put(seq, cls, topic, payload)
        except (OSError, ValueError) as e:
            self.storage_error = "%s: %s" % (kind, e)
            self.unstored[cls] = self.unstored.get(cls, 0) + 1
            log("could not buffer %s seq %s: %r" % (kind, seq, e))
            return None
        self.storage_error = None
        if self.s.log_stores:
            log("stored %s seq %d" % (kind, seq))
        self.wake.set()
        return seq

    def _dropped(self):
        out = dict(self.buf.dropped)
        for cls, n in self.unstored.items():
            name = ("telemetry", "event", "result", "other")[cls]
            out[name] = out.get(name, 0) + n
        return out

    def event(self, etype, message, severity="info", data=None):
        return self.store("event/" + etype, "event",
                          {"type": etype, "severity": severity, "message": message, "data": data or {}}, CLS_EVENT)

    # ---- status ------------------------------------------------------------------------------
    def status_body(self, state="online"):
        free, alloc = heap()
        body = {
            "state": state,
            "uptime": self.uptime_ms() / 1000,
            "mem": round(100 * alloc / (free + alloc), 1) if free + alloc else 0.0,
            "heap_free": free, "heap_alloc": alloc,
            "link": "up" if self.mqtt.connected else "down",
            "outbox": len(self.buf), "outbox_bytes": self.buf.bytes(),
            "dropped": self._dropped(),
            "storage": "ok" if self.storage_error is None else "error: " + self.storage_error,
            "unacked": len(self.inflight),
            "agent": {"version": VERSION, "platform": sys.platform, "kind": "micropython",
                      "max_payload": self.s.max_packet},
            "handlers": sorted(self.handlers),
            # an executor of scheduled tasks (protocol §3): one at a time, those it holds, its idle pace
            "slots": 1, "tasks": self.tasks.held() if self.tasks else [], "interval": self.s.status_interval,
            "sensor_errors": self.stats["sensor_errors"],
            "clock": "set" if clock_is_set() else "unset",
        }
        if self.hw is not None:
            body.update(self.hw.status())
        body["firmware"] = self.ota.status() if self.ota is not None else {"version": VERSION}
        return body

    async def send_status(self, kind="status"):
        body = self.status_body()
        if kind == "birth":
            body["will_seq"] = self.will_seq
        topic, seq, payload = self.seal("status", kind, body)
        await self.mqtt.publish(topic, payload, qos=1, retain=True, wait=False)

    # ---- downlink ----------------------------------------------------------------------------
    def _key_for(self, sender, kv):
        if sender == "cloud":
            return self.k_cloud
        if self.s.gateway is not None and sender == self.s.gateway:
            return self.k_gw
        return None

    async def on_message(self, topic, payload, retain):
        if not topic.startswith(self.base):
            return
        channel = topic[len(self.base):]
        if channel == "ota/data":
            if self.ota is not None:
                await self.ota.on_data(payload)
            return
        try:
            header, body = envelope.open(payload, topic, self.s.node, self._key_for)
        except envelope.EnvelopeError as e:
            self.stats["rejected"] += 1
            log("rejected a message on %s: %s (%s)" % (topic, e.reason, e))
            return
        kind = header["kind"]
        if not clock_is_set() and self.hw is not None and header["ts"] >= CLOCK_SET_MS:
            self.hw.set_clock(header["ts"])  # no NTP: the gateway's or cloud's sealed clock will do
        if channel == "ack" and kind == "ack":
            self.on_ack(header, body)
            return
        if kind == "config" and header["from"] == self.s.gateway:
            r = body.get("route") if isinstance(body, dict) else None
            if header["seq"] > self.routes[0] and routes_ok(r):
                self.routes = [header["seq"], r]
                try:
                    with open(self.state_dir + "/routes", "w") as f:
                        f.write(json.dumps(self.routes))
                except OSError:
                    pass  # used in memory; the gateway sends it again at the next birth
            return
        if header["from"] != "cloud" or channel not in ("task/cmd", "config"):
            self.stats["rejected"] += 1
            log("ignored %s from %s on %s" % (kind, header["from"], channel))
            return
        fresh = self.replay.check(header["seq"])
        if not fresh:
            log("replayed %s seq %d ignored" % (kind, header["seq"]))
        elif channel == "task/cmd" and kind == "task_cmd" and self.tasks is not None:
            self.tasks.submit(body)  # saved on flash before the receipt lets the gateway forget it
        elif kind == "config":
            log("config from the cloud ignored (no device settings are pushed yet)")
        await self.receipt(header["seq"])  # new or repeated: the gateway may forget it

    def on_oversize(self, topic, size):
        """A message too big for this device's heap was read through and dropped: say so."""
        self.stats["rejected"] += 1
        self.event("oversize", "dropped a %d-byte message on %s: this device takes at most %d bytes"
                   % (size, topic, self.s.max_packet), "error", {"topic": topic, "bytes": size})

    async def receipt(self, seq):
        if self.s.gateway is None or not self.mqtt.connected:
            return
        topic, _, payload = self.seal("receipt", "ack", {"received": [[seq, seq]]}, to=self.s.gateway)
        try:
            await self.mqtt.publish(topic, payload, qos=0)
        except OSError:
            pass

    def on_ack(self, header, body):
        if not isinstance(body, dict):
            return
        ranges = []
        if header["from"] == self.s.gateway or header["from"] == "cloud" and self.s.gateway is None:
            custody, acks = body.get("custody"), body.get("acks")
            ranges = list(custody) if isinstance(custody, list) else []
            for e in acks if isinstance(acks, list) else ():  # a device without a gateway: the cloud's end-to-end acks
                if isinstance(e, list) and len(e) == 3 and e[0] == self.s.node:
                    ranges.append(e[1:])
        freed = 0
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], int)):
                continue
            first, last = r
            freed += self.buf.ack(first, last)
            for seq in list(self.inflight):
                if first <= seq <= last:
                    del self.inflight[seq]
            if self.run_first_seq is not None and last >= self.run_first_seq:
                self.healthy.set()  # something sealed by this run was taken into custody
        busy = body.get("busy")
        if isinstance(busy, (int, float)) and not isinstance(busy, bool) and busy > 0:
            # the gateway's outbox is (nearly) full: no new bulk telemetry for that long, and what it
            # refused waits out the pause (statuses, events and results still go)
            self.busy_until = ticks_add(ticks_ms(), int(min(busy, 3600) * 1000))
            refused = body.get("refused")
            for r in refused if isinstance(refused, list) else ():
                if isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], int):
                    self.refused.append((r[0], r[1]))
                    for seq in list(self.inflight):
                        if r[0] <= seq <= r[1]:
                            del self.inflight[seq]
            del self.refused[:-32]
        self.stats["acked"] += freed
        if freed:
            self.wake.set()

    # ---- uplink ------------------------------------------------------------------------------
    def _paused(self, now):
        if self.busy_until is None:
            return False
        if ticks_diff(self.busy_until, now) > 0:
            return True
        self.busy_until = None
        self.refused = []
        return False

    def __contains__(self, seq):
        """The sender's skip test while paused: in flight, or refused until the pause ends."""
        if seq in self.inflight:
            return True
        for a, b in self.refused:
            if a <= seq <= b:
                return True
        return False

    async def sender(self):
        """Keep up to ``window`` buffered messages in flight; retransmit unacked ones with backoff."""
        base = int(self.s.retransmit * 1000)
        while True:
            try:
                await wait_for_ms(self.wake.wait(), 250)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            if not self.mqtt.connected:
                continue
            now = ticks_ms()
            for seq in list(self.inflight):
                st = self.inflight.get(seq)
                if st is None or ticks_diff(now, st[0]) < min(base << min(st[1], 4), 60000):
                    continue
                await self._send_one(seq, st[1] + 1)
            for seq, topic in self.due(now):
                await self._send_one(seq, 0)
                if not self.mqtt.connected:
                    break

    def due(self, now):
        """Buffered messages to send now: window room, oldest first; while the gateway asks for a
        pause, no telemetry and nothing it refused."""
        # a message sent twice already without a custody ack (a gateway that will not take it) still
        # gets retransmitted, but no longer holds window room: it cannot starve the rest
        room = self.s.window
        for st in self.inflight.values():
            if st[1] < 2:
                room -= 1
        if room <= 0:
            return []
        if self._paused(now):
            return self.buf.pending(room, self, (CLS_EVENT, CLS_RESULT, CLS_OTHER))
        return self.buf.pending(room, self.inflight)

    async def _send_one(self, seq, attempts):
        rec = self.buf.get(seq)
        if rec is None:
            self.inflight.pop(seq, None)
            return
        topic, payload = rec
        try:
            await self.mqtt.publish(topic, payload, qos=1, wait=False)
        except OSError:
            return
        self.inflight[seq] = [ticks_ms(), attempts]
        self.stats["sent"] += 1

    # ---- sensors -----------------------------------------------------------------------------
    async def sensor_loop(self):
        if not self.sensors:
            return
        due = [ticks_ms()] * len(self.sensors)
        while True:
            now = ticks_ms()
            for i, sensor in enumerate(self.sensors):
                if ticks_diff(now, due[i]) < 0:
                    continue
                due[i] = now + int(sensor.interval * 1000)
                try:
                    values = sensor.read(self.uptime_ms() / 1000)
                except Exception as e:  # noqa: BLE001 - a sensor's failure is reported, never fatal
                    self.stats["sensor_errors"] += 1
                    log("sensor %s failed: %s" % (sensor.stream, e))
                    if self.stats["sensor_errors"] in (1, 10, 100, 1000):
                        self.event("sensor", "sensor %s failed: %s" % (sensor.stream, e), "warning",
                                   {"stream": sensor.stream, "errors": self.stats["sensor_errors"]})
                    continue
                self.add_reading(sensor.stream, values)
            self.flush_batches(False)
            nxt = min(ticks_diff(d, ticks_ms()) for d in due)
            await sleep_ms(max(20, min(nxt, 1000)))

    def add_reading(self, stream, values):
        b = self.batches.get(stream)
        if b is None:
            b = self.batches[stream] = [[], ticks_ms()]
        if not b[0]:
            b[1] = ticks_ms()
        b[0].append({"ts": now_ms(), "values": values})
        if len(b[0]) >= self.s.max_readings:
            self._flush(stream, b)

    def flush_batches(self, force):
        now = ticks_ms()
        for stream, b in self.batches.items():
            if b[0] and (force or ticks_diff(now, b[1]) >= self.s.max_delay * 1000):
                self._flush(stream, b)

    def _flush(self, stream, b):
        self.store("telemetry/" + stream, "telemetry", {"stream": stream, "readings": b[0]}, CLS_TELEMETRY)
        b[0] = []
        gc.collect()

    # ---- connection --------------------------------------------------------------------------
    async def session(self):
        """One MQTT connection: will, CONNECT, subscriptions, birth; returns when it drops."""
        _, self.will_seq, will = self.seal("status", "death", {"state": "offline", "reason": "connection lost"})
        await self.mqtt.connect(will=(self.base + "status", will, True))
        self.stats["connects"] += 1
        log("connected to %s:%d" % (self.s.host, self.s.port))
        for channel in ("ack", "task/cmd", "config", "ota/data"):
            await self.mqtt.subscribe(self.base + channel, 1)
        self.inflight = {}  # resend everything unacked at once (the gateway dedupes)
        await self.send_status("birth")
        self.wake.set()
        await self.mqtt.down.wait()
        log("connection lost:", self.mqtt.error)

    async def status_loop(self):
        last = ticks_ms()
        while True:
            await sleep_ms(500)
            every, t = self.s.status_interval, self.tasks
            if t and t.lease and t.held():  # a leased task held: a heartbeat every third of its lease
                every = min(every, t.lease / 3)
            if ticks_diff(ticks_ms(), last) < every * 1000:
                continue
            last = ticks_ms()
            if self.mqtt.connected:
                try:
                    await self.send_status()
                except OSError:
                    pass

    async def link_loop(self, wifi):
        """WiFi, then MQTT, forever: back off 1 s doubling to 60 s after each failure."""
        backoff = 1000
        while True:
            try:
                if wifi is not None:
                    await wifi.up()
                await self.session()
                backoff = 1000
            except (OSError, MQTTError, asyncio.TimeoutError) as e:
                log("broker %s:%d: %r; retrying in %d s" % (self.s.host, self.s.port, e, backoff // 1000))
                if isinstance(e, MQTTError) and e.code in (4, 5):
                    backoff = max(backoff, 30000)  # refused credentials: do not hammer the broker
            await self.mqtt.close()
            await sleep_ms(backoff)
            backoff = min(backoff * 2, 60000)

    async def watchdog(self):
        """Feed the hardware watchdog while the event loop runs: a call that blocks it for longer
        than ``watchdog`` seconds (a wedged driver, DNS) resets the board; its data is on flash."""
        try:
            from machine import WDT
        except ImportError:
            return
        wdt = WDT(timeout=int(self.s.watchdog * 1000))
        while True:
            wdt.feed()
            await sleep_ms(min(5000, int(self.s.watchdog * 250)))

    async def run(self, wifi=None):
        log("agent %s of site %s, firmware %s, %d buffered" % (self.s.node, self.s.site, VERSION, len(self.buf)))
        jobs = [self.link_loop(wifi), self.sender(), self.sensor_loop(), self.status_loop()]
        if self.s.watchdog:
            jobs.append(self.watchdog())
        if wifi is not None:
            jobs.append(wifi.watch(self.mqtt))
        if self.tasks is not None:
            jobs.append(self.tasks.run())
        if self.ota is not None:
            jobs.append(self.ota.watch())
        await asyncio.gather(*jobs)
