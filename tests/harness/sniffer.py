"""A plain paho MQTT client that records what it may subscribe to: a broker-side observer for tests."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from harness.wait import wait_for


class Sniffer:
    """A plain MQTT client (a broker-side observer) collecting what it may subscribe to."""

    def __init__(self, port: int, username: str, password: str, client_id: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.c.username_pw_set(username, password)
        self.messages: list[tuple[str, bytes]] = []
        self.granted: dict[int, list[int]] = {}
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.c.on_connect = lambda *_a: self.ready.set()
        self.c.on_message = lambda _c, _u, m: self._add(m.topic, m.payload)
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self.granted.__setitem__(mid, [c.value for c in codes])
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(10)

    def _add(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, payload))

    def subscribe(self, flt: str) -> int:
        _rc, mid = self.c.subscribe(flt, qos=1)
        return wait_for(lambda: self.granted.get(mid), timeout=10, message=f"SUBACK for {flt}")[0]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
