"""A node's sealing endpoint: its identity, its ``seq`` counter and its clock, in one place.

Sans-I/O: the clock and the peer-key lookup are injected; persistence of the counter is the
:class:`~cwsnet.replay.SeqCounter`'s callback.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import nacl.public

from cwsnet import envelope
from cwsnet.envelope import Header, Opened
from cwsnet.errors import EnvelopeError, ForgedEnvelope, UnknownSender
from cwsnet.identity import Identity
from cwsnet.replay import SeqCounter


class Endpoint:
    def __init__(
        self,
        identity: Identity,
        seq: SeqCounter,
        peer_key: Callable[[str], nacl.public.PublicKey | None],
        clock: Callable[[], float] = time.time,
        *,
        key_version: int | None = None,
        versioned_key: Callable[[str, int | None], nacl.public.PublicKey | None] | None = None,
    ) -> None:
        self.identity = identity
        self.seq = seq
        self.peer_key = peer_key
        self.clock = clock
        #: version of ``identity``'s key pair, sent in every header (None: not sent, version 1)
        self.key_version = key_version
        #: key lookup for opening that knows versions and revocation (else ``peer_key``)
        self.versioned_key = versioned_key
        #: secret keys this node held before a rotation: messages sealed to them still open
        self.previous_secrets: list[nacl.public.PrivateKey] = []
        # Box(my_secret, peer_public) precomputes the X25519 shared key: keep the recent ones
        self._boxes: OrderedDict[bytes, nacl.public.Box] = OrderedDict()

    BOX_CACHE = 4096
    PREVIOUS_KEPT = 2

    def rekey(self, identity: Identity, key_version: int | None) -> None:
        """Switch to a rotated key pair; the old secret key still opens what was sealed to it."""
        if bytes(identity.secret_key) == bytes(self.identity.secret_key):
            self.key_version = key_version
            return
        self.previous_secrets = [self.identity.secret_key, *self.previous_secrets][: self.PREVIOUS_KEPT]
        self.identity = identity
        self.key_version = key_version
        self._boxes.clear()

    def box(self, peer: nacl.public.PublicKey) -> nacl.public.Box:
        raw = bytes(peer)
        box = self._boxes.get(raw)
        if box is None:
            box = self._boxes[raw] = nacl.public.Box(self.identity.secret_key, peer)
            if len(self._boxes) > self.BOX_CACHE:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(raw)
        return box

    @property
    def node(self) -> str:
        return self.identity.node

    def header(self, kind: str, to: str, trace: str | None = None, seq: int | None = None,
               expires: int | None = None) -> Header:
        return Header(
            id=envelope.new_message_id(),
            sender=self.identity.node,
            recipient=to,
            seq=self.seq.next() if seq is None else seq,
            ts=int(self.clock() * 1000),
            kind=kind,
            trace=trace,
            expires=expires,
            key_version=self.key_version,
        )

    def seal(
        self, topic: str, kind: str, body: Any, *, to: str, trace: str | None = None, seq: int | None = None,
        expires: int | None = None, recipient_key: nacl.public.PublicKey | None = None,
    ) -> tuple[bytes, Header]:
        """Seal ``body`` for ``to`` (with its key from ``peer_key``, or ``recipient_key``: the key
        version a peer is known to hold right now, e.g. during its rotation)."""
        key = recipient_key or self.peer_key(to)
        if key is None:
            raise UnknownSender(f"no public key for recipient {to!r}")
        header = self.header(kind, to, trace, seq, expires)
        payload = envelope.seal(
            topic=topic, header=header, body=body, sender_key=self.identity.secret_key, recipient_key=key,
            box=self.box(key),
        )
        return payload, header

    def open(self, payload: bytes, topic: str) -> Opened:
        try:
            return envelope.open_envelope(
                payload, topic=topic, me=self.identity.node, my_key=self.identity.secret_key,
                sender_key=self.peer_key, box_for=self.box, versioned_key=self.versioned_key,
            )
        except ForgedEnvelope:
            for old in self.previous_secrets:  # sealed to the key this node had before a rotation?
                try:
                    return envelope.open_envelope(payload, topic=topic, me=self.identity.node, my_key=old,
                                                  sender_key=self.peer_key, versioned_key=self.versioned_key)
                except ForgedEnvelope:
                    continue
            raise

    def open_or_log(self, payload: bytes, topic: str, log: logging.Logger, what: str = "message") -> Opened | None:
        """Open a received message, or log why it was rejected (with its reason label) and return None."""
        try:
            return self.open(payload, topic)
        except EnvelopeError as exc:
            log.warning("rejected %s on %s: %s (%s)", what, topic, exc, exc.reason)
            return None
