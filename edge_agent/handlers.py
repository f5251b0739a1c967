"""Task handlers: async callables registered by name. ``args`` in, a result map out.

A handler raises :class:`TaskFailed` (or any exception) to fail the task; the message is sent back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class TaskFailed(Exception):
    """A handler's clear, user-facing failure (bad arguments, refused work)."""


async def echo(args: dict[str, Any]) -> dict[str, Any]:
    return dict(args)


async def sha256(args: dict[str, Any]) -> dict[str, Any]:
    data = args.get("data")
    if isinstance(data, bytes):
        raw = data
    elif isinstance(data, str):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise TaskFailed("args.data is not valid base64") from None
    else:
        raise TaskFailed('sha256 needs args {"data": <base64 string>}')
    if len(raw) > 64 * 1024 * 1024:
        raise TaskFailed("args.data is larger than 64 MiB")
    digest = await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest()) if len(raw) > 1 << 20 else (
        hashlib.sha256(raw).hexdigest()
    )
    return {"sha256": digest, "bytes": len(raw)}


async def sleep(args: dict[str, Any]) -> dict[str, Any]:
    seconds = args.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 3600:
        raise TaskFailed('sleep needs args {"seconds": <number between 0 and 3600>}')
    await asyncio.sleep(seconds)
    return {"slept": seconds}


BUILTIN: dict[str, Handler] = {"echo": echo, "sha256": sha256, "sleep": sleep}


def registry(names: list[str]) -> dict[str, Handler]:
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        from cwsnet.errors import ConfigError

        raise ConfigError(f"handlers: unknown handler(s) {unknown}; known: {sorted(BUILTIN)}")
    return {n: BUILTIN[n] for n in names}
