"""CWSNet's error tree. Third-party errors (paho, nacl, cbor2, sqlite) are translated into these
at the boundary, so callers catch one family and every message names what went wrong and where."""

from __future__ import annotations


class CwsError(Exception):
    """Base of every error CWSNet raises on purpose."""


class ConfigError(CwsError):
    """A config file, flag or environment value is wrong; the message names file, field and value."""


class TopicError(CwsError, ValueError):
    """A topic or name is not part of the CWSNet namespace."""


class EnvelopeError(CwsError):
    """A received payload was rejected. ``reason`` is a stable metric/event label."""

    reason = "invalid"

    def __init__(self, message: str, *, sender: str | None = None, seq: int | None = None) -> None:
        super().__init__(message)
        self.sender = sender
        self.seq = seq


class MalformedEnvelope(EnvelopeError):
    reason = "malformed"


class UnsupportedVersion(EnvelopeError):
    reason = "version"


class UnknownSender(EnvelopeError):
    reason = "unknown_sender"


class ForgedEnvelope(EnvelopeError):
    """The box did not authenticate (tampered bytes, wrong key) or the bound header differs."""

    reason = "forged"


class TopicMismatch(EnvelopeError):
    """The envelope was sealed for another topic (re-published elsewhere) or names another sender."""

    reason = "topic_mismatch"


class NotForMe(EnvelopeError):
    reason = "wrong_recipient"


class ReplayedEnvelope(EnvelopeError):
    reason = "replay"
