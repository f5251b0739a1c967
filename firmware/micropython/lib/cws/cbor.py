"""A small CBOR (RFC 8949) encoder/decoder: the subset the CWSNet protocol uses.

Encoding reproduces cbor2's default output byte for byte: shortest-form integers (up to
64 bits), definite lengths, floats as float64 (0xfb) except NaN/inf (shortest float16, as
cbor2 does), maps in iteration order. MicroPython's dicts do NOT keep insertion order, so
where the order matters (the header, anything compared byte for byte) pass a :class:`Map`
(a list of key/value pairs) or an ``OrderedDict``.

Note: on ports with single-precision floats (ESP32) a float is widened to float64 on the wire,
so 21.5 encodes like CPython but 0.1 does not (it is the float32 nearest to 0.1).

Decoding accepts definite-length items only (what cbor2 and this encoder write), rejects
malformed, truncated or trailing input, duplicate or unhashable map keys, tags and unknown
simple values with :class:`CBORError`, and bounds nesting depth. It never loops: every item
consumes at least one byte and lengths are checked against the remaining input first.
"""

from struct import pack, unpack

MAX_DEPTH = 16


class CBORError(ValueError):
    pass


class Map:
    """An ordered CBOR map: ``Map([("v", 1), ("id", b"...")])``."""

    __slots__ = ("pairs",)

    def __init__(self, pairs=None):
        self.pairs = list(pairs) if pairs is not None else []

    def __setitem__(self, k, v):
        for i, kv in enumerate(self.pairs):
            if kv[0] == k:
                self.pairs[i] = (k, v)
                return
        self.pairs.append((k, v))

    def __getitem__(self, k):
        for kk, v in self.pairs:
            if kk == k:
                return v
        raise KeyError(k)

    def __contains__(self, k):
        for kk, _ in self.pairs:
            if kk == k:
                return True
        return False

    def get(self, k, default=None):
        for kk, v in self.pairs:
            if kk == k:
                return v
        return default

    def __len__(self):
        return len(self.pairs)

    def items(self):
        return self.pairs

    def to_dict(self):
        return {k: v for k, v in self.pairs}


def _head(out, major, n):
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out.append(mt | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(mt | 25)
        out.extend(pack(">H", n))
    elif n < 0x100000000:
        out.append(mt | 26)
        out.extend(pack(">I", n))
    elif n < 0x10000000000000000:
        out.append(mt | 27)
        out.extend(n.to_bytes(8, "big"))
    else:
        raise CBORError("integer does not fit in 64 bits")


def _enc(out, v, depth):
    if depth > MAX_DEPTH:
        raise CBORError("nesting deeper than %d" % MAX_DEPTH)
    if v is None:
        out.append(0xF6)
    elif v is True:
        out.append(0xF5)
    elif v is False:
        out.append(0xF4)
    elif isinstance(v, int):
        if v >= 0:
            _head(out, 0, v)
        else:
            _head(out, 1, -1 - v)
    elif isinstance(v, str):
        b = v.encode("utf-8")
        _head(out, 3, len(b))
        out.extend(b)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        _head(out, 2, len(v))
        out.extend(v)
    elif isinstance(v, float):
        if v != v:
            out.extend(b"\xf9\x7e\x00")
        elif v in (float("inf"), float("-inf")):
            out.extend(b"\xf9\x7c\x00" if v > 0 else b"\xf9\xfc\x00")
        else:
            out.append(0xFB)
            out.extend(pack(">d", v))
    elif isinstance(v, (list, tuple)):
        _head(out, 4, len(v))
        for x in v:
            _enc(out, x, depth + 1)
    elif isinstance(v, (Map, dict)):
        items = v.items()
        _head(out, 5, len(v))
        for k, x in items:
            _enc(out, k, depth + 1)
            _enc(out, x, depth + 1)
    else:
        raise CBORError("cannot encode a %s" % type(v).__name__)


def dumps(v):
    """Encode ``v`` to CBOR bytes (cbor2-compatible)."""
    out = bytearray()
    _enc(out, v, 0)
    return bytes(out)


def _half(b):
    h = (b[0] << 8) | b[1]
    e = (h >> 10) & 0x1F
    f = h & 0x3FF
    if e == 0:
        v = f * 2.0 ** -24
    elif e == 31:
        v = float("nan") if f else float("inf")
    else:
        v = (f + 1024) * 2.0 ** (e - 25)
    return -v if h & 0x8000 else v


class _Reader:
    def __init__(self, data):
        self.b = data
        self.i = 0
        self.n = len(data)

    def take(self, k):
        i = self.i
        if k > self.n - i:
            raise CBORError("truncated CBOR at byte %d" % i)
        self.i = i + k
        return self.b[i:i + k]

    def arg(self, ai):
        if ai < 24:
            return ai
        if ai == 24:
            return self.take(1)[0]
        if ai == 25:
            return unpack(">H", self.take(2))[0]
        if ai == 26:
            return unpack(">I", self.take(4))[0]
        if ai == 27:
            return int.from_bytes(self.take(8), "big")
        if ai == 31:
            raise CBORError("indefinite-length items are not supported")
        raise CBORError("reserved additional information %d" % ai)

    def item(self, depth):
        if depth > MAX_DEPTH:
            raise CBORError("nesting deeper than %d" % MAX_DEPTH)
        ib = self.take(1)[0]
        major = ib >> 5
        ai = ib & 0x1F
        if major == 7:
            if ai == 20:
                return False
            if ai == 21:
                return True
            if ai == 22:
                return None
            if ai == 25:
                return _half(self.take(2))
            if ai == 26:
                return unpack(">f", self.take(4))[0]
            if ai == 27:
                return unpack(">d", self.take(8))[0]
            raise CBORError("unsupported simple value %d" % ai)
        n = self.arg(ai)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major == 2:
            return bytes(self.take(n))
        if major == 3:
            try:
                return str(self.take(n), "utf-8")
            except UnicodeError:
                raise CBORError("text string is not UTF-8") from None
        if major == 4:
            if n > self.n - self.i:  # every item takes at least one byte
                raise CBORError("truncated CBOR array")
            return [self.item(depth + 1) for _ in range(n)]
        if major == 5:
            if 2 * n > self.n - self.i:
                raise CBORError("truncated CBOR map")
            d = {}
            for _ in range(n):
                k = self.item(depth + 1)
                if isinstance(k, (list, dict)):
                    raise CBORError("map key is not hashable")
                if k in d:
                    raise CBORError("duplicate map key %r" % (k,))
                d[k] = self.item(depth + 1)
            return d
        raise CBORError("CBOR tags are not supported")


def loads(data):
    """Decode exactly one CBOR item from ``data``; raise CBORError if it is malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CBORError("CBOR input must be bytes")
    r = _Reader(bytes(data))
    v = r.item(0)
    if r.i != r.n:
        raise CBORError("%d trailing bytes after the CBOR item" % (r.n - r.i))
    return v
