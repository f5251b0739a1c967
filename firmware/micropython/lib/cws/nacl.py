"""NaCl's crypto_box in pure MicroPython: X25519, HSalsa20/XSalsa20, Poly1305, secretbox.

MicroPython has no NaCl primitives (only SHA-256 and AES), so the firmware seals with these.
Byte-identical to libsodium/PyNaCl (checked by tests/test_firmware_core.py on the unix port,
the 32-bit WebAssembly port and CPython). Written for 32-bit ports, where small ints are
31 bits: every 32-bit word operation is masked with 0xffffffff, so words >= 2**30 simply become
(slower, heap-allocated) big ints there and stay exact.

Usage on the device (X25519 is the slow part: do it once per peer and keep the key)::

    k = box_beforenm(peer_public, my_secret)          # 32-byte shared key
    c = secretbox(k, nonce24, plaintext)              # tag (16) + ciphertext
    p = secretbox_open(k, nonce24, c)                 # raises CryptoError if forged

Side channels: X25519 here uses big-int arithmetic and a conditional swap, and big-int
timing depends on values: it is not constant-time in the strict sense (fine for a device
that only ever runs it on its own key at boot). The Poly1305 tag check is constant-time.
"""

from struct import pack, unpack

try:
    from os import urandom
except ImportError:  # the WebAssembly port has no os.urandom; callers there pass nonces in
    urandom = None

M = 0xFFFFFFFF
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


class CryptoError(Exception):
    pass


def _core(s, add):
    """The Salsa20/20 core on a list of 16 words; returns 16 words (feed-forward if ``add``)."""
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = s
    for _ in range(10):
        t = (x0 + x12) & M; x4 ^= ((t << 7) & M) | (t >> 25)
        t = (x4 + x0) & M; x8 ^= ((t << 9) & M) | (t >> 23)
        t = (x8 + x4) & M; x12 ^= ((t << 13) & M) | (t >> 19)
        t = (x12 + x8) & M; x0 ^= ((t << 18) & M) | (t >> 14)
        t = (x5 + x1) & M; x9 ^= ((t << 7) & M) | (t >> 25)
        t = (x9 + x5) & M; x13 ^= ((t << 9) & M) | (t >> 23)
        t = (x13 + x9) & M; x1 ^= ((t << 13) & M) | (t >> 19)
        t = (x1 + x13) & M; x5 ^= ((t << 18) & M) | (t >> 14)
        t = (x10 + x6) & M; x14 ^= ((t << 7) & M) | (t >> 25)
        t = (x14 + x10) & M; x2 ^= ((t << 9) & M) | (t >> 23)
        t = (x2 + x14) & M; x6 ^= ((t << 13) & M) | (t >> 19)
        t = (x6 + x2) & M; x10 ^= ((t << 18) & M) | (t >> 14)
        t = (x15 + x11) & M; x3 ^= ((t << 7) & M) | (t >> 25)
        t = (x3 + x15) & M; x7 ^= ((t << 9) & M) | (t >> 23)
        t = (x7 + x3) & M; x11 ^= ((t << 13) & M) | (t >> 19)
        t = (x11 + x7) & M; x15 ^= ((t << 18) & M) | (t >> 14)
        t = (x0 + x3) & M; x1 ^= ((t << 7) & M) | (t >> 25)
        t = (x1 + x0) & M; x2 ^= ((t << 9) & M) | (t >> 23)
        t = (x2 + x1) & M; x3 ^= ((t << 13) & M) | (t >> 19)
        t = (x3 + x2) & M; x0 ^= ((t << 18) & M) | (t >> 14)
        t = (x5 + x4) & M; x6 ^= ((t << 7) & M) | (t >> 25)
        t = (x6 + x5) & M; x7 ^= ((t << 9) & M) | (t >> 23)
        t = (x7 + x6) & M; x4 ^= ((t << 13) & M) | (t >> 19)
        t = (x4 + x7) & M; x5 ^= ((t << 18) & M) | (t >> 14)
        t = (x10 + x9) & M; x11 ^= ((t << 7) & M) | (t >> 25)
        t = (x11 + x10) & M; x8 ^= ((t << 9) & M) | (t >> 23)
        t = (x8 + x11) & M; x9 ^= ((t << 13) & M) | (t >> 19)
        t = (x9 + x8) & M; x10 ^= ((t << 18) & M) | (t >> 14)
        t = (x15 + x14) & M; x12 ^= ((t << 7) & M) | (t >> 25)
        t = (x12 + x15) & M; x13 ^= ((t << 9) & M) | (t >> 23)
        t = (x13 + x12) & M; x14 ^= ((t << 13) & M) | (t >> 19)
        t = (x14 + x13) & M; x15 ^= ((t << 18) & M) | (t >> 14)

    if add:
        return (
            (x0 + s[0]) & M, (x1 + s[1]) & M, (x2 + s[2]) & M, (x3 + s[3]) & M,
            (x4 + s[4]) & M, (x5 + s[5]) & M, (x6 + s[6]) & M, (x7 + s[7]) & M,
            (x8 + s[8]) & M, (x9 + s[9]) & M, (x10 + s[10]) & M, (x11 + s[11]) & M,
            (x12 + s[12]) & M, (x13 + s[13]) & M, (x14 + s[14]) & M, (x15 + s[15]) & M,
        )
    return (x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)


def _state(key, n4):
    """The Salsa20 input block: constants, 8 key words, 4 words of nonce/counter."""
    k = unpack("<8I", key)
    return [_SIGMA[0], k[0], k[1], k[2], k[3], _SIGMA[1], n4[0], n4[1],
            n4[2], n4[3], _SIGMA[2], k[4], k[5], k[6], k[7], _SIGMA[3]]


def hsalsa20(key, n16):
    """HSalsa20(key32, nonce16) -> 32-byte subkey."""
    if len(key) != 32 or len(n16) != 16:
        raise ValueError("hsalsa20 needs a 32-byte key and a 16-byte input")
    x = _core(_state(key, unpack("<4I", n16)), False)
    return pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


def xsalsa20_stream(key, nonce, length):
    """``length`` bytes of the XSalsa20 key stream for (key32, nonce24)."""
    if len(nonce) != 24:
        raise ValueError("xsalsa20 needs a 24-byte nonce")
    sub = hsalsa20(key, nonce[:16])
    n = unpack("<2I", nonce[16:])
    s = _state(sub, (n[0], n[1], 0, 0))
    out = bytearray((length + 63) & ~63)
    pos = 0
    ctr = 0
    while pos < length:
        s[8] = ctr & M
        s[9] = (ctr >> 32) & M
        out[pos:pos + 64] = pack("<16I", *_core(s, True))
        pos += 64
        ctr += 1
    return out[:length] if len(out) != length else out


def _xor(a, b):
    """a XOR b for equal-length byte strings, as one big-int operation (fast in MicroPython)."""
    n = len(a)
    if n == 0:
        return b""
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


_P1305 = (1 << 130) - 5
_M130 = (1 << 130) - 1
_CLAMP = 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF


def poly1305(key, msg):
    """The Poly1305 one-time authenticator of ``msg`` under a 32-byte one-time key."""
    r = int.from_bytes(key[:16], "little") & _CLAMP
    s = int.from_bytes(key[16:32], "little")
    h = 0
    n = len(msg)
    i = 0
    pad = 1 << 128
    while i + 16 <= n:
        h = (h + (int.from_bytes(msg[i:i + 16], "little") | pad)) * r
        h = (h & _M130) + 5 * (h >> 130)  # partial reduction mod 2^130 - 5; full one at the end
        i += 16
    if i < n:
        rest = msg[i:]
        h = (h + (int.from_bytes(rest, "little") | (1 << (8 * len(rest))))) * r
        h = (h & _M130) + 5 * (h >> 130)
    h %= _P1305
    return ((h + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def verify16(a, b):
    """Constant-time equality of two 16-byte strings."""
    if len(a) != 16 or len(b) != 16:
        return False
    d = 0
    for i in range(16):
        d |= a[i] ^ b[i]
    return d == 0


def secretbox(key, nonce, msg):
    """XSalsa20-Poly1305 (crypto_secretbox_easy): 16-byte tag, then the ciphertext."""
    if len(key) != 32:
        raise ValueError("secretbox needs a 32-byte key")
    ks = xsalsa20_stream(key, nonce, 32 + len(msg))
    c = _xor(msg, ks[32:])
    return poly1305(ks[:32], c) + c


def secretbox_open(key, nonce, box):
    """Open a crypto_secretbox_easy box; raises CryptoError if it does not authenticate."""
    if len(key) != 32:
        raise ValueError("secretbox needs a 32-byte key")
    if len(box) < 16:
        raise CryptoError("box is shorter than its tag")
    tag = box[:16]
    c = box[16:]
    ks = xsalsa20_stream(key, nonce, 32 + len(c))
    if not verify16(poly1305(ks[:32], c), tag):
        raise CryptoError("box did not authenticate")
    return _xor(c, ks[32:])


_P = (1 << 255) - 19
_M255 = (1 << 255) - 1
_A24 = 121665


def _red(x):
    """x mod 2^255-19, for 0 <= x < 2^512 (two folds and a final %), faster than a bare % ."""
    x = (x & _M255) + 19 * (x >> 255)
    x = (x & _M255) + 19 * (x >> 255)
    return x if x < _P else x - _P


def x25519(scalar, u):
    """RFC 7748 X25519(scalar32, u32) -> 32 bytes (Montgomery ladder on big ints)."""
    if len(scalar) != 32 or len(u) != 32:
        raise ValueError("x25519 needs 32-byte inputs")
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    k = int.from_bytes(k, "little")
    x1 = int.from_bytes(u, "little") & _M255
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    P = _P
    red = _red
    for t in range(254, -1, -1):
        kt = (k >> t) & 1
        if swap ^ kt:
            x2, x3 = x3, x2
            z2, z3 = z3, z2
        swap = kt
        a = x2 + z2
        b = x2 - z2 + P
        c = x3 + z3
        d = x3 - z3 + P
        aa = red(a * a)
        bb = red(b * b)
        e = aa - bb + P
        da = red(d * a)
        cb = red(c * b)
        t1 = da + cb
        t2 = da - cb + P
        x3 = red(t1 * t1)
        z3 = red(x1 * red(t2 * t2))
        x2 = red(aa * bb)
        z2 = red(e * (aa + _A24 * e))
    if swap:
        x2, x3 = x3, x2
        z2, z3 = z3, z2
    return red(x2 * pow(z2, P - 2, P)).to_bytes(32, "little")


_BASE = b"\x09" + bytes(31)


def public_key(secret):
    """The X25519 public key of a 32-byte secret key."""
    return x25519(secret, _BASE)


def box_beforenm(peer_public, my_secret):
    """crypto_box_beforenm: the 32-byte key shared with a peer (one X25519, then HSalsa20)."""
    s = x25519(my_secret, peer_public)
    if s == bytes(32):
        raise CryptoError("peer public key is a low-order point")
    return hsalsa20(s, bytes(16))


def random_nonce():
    if urandom is None:
        raise CryptoError("this port has no os.urandom; pass the nonce in")
    return urandom(24)
