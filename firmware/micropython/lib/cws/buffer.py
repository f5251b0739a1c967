"""The agent's offline buffer on flash, and its durable sequence mark (docs/protocol.md §2, §5).

Every sealed message is ``put`` here before it is published and leaves only when the gateway's
custody ack names its ``seq`` (``ack(first, last)`` per range). After a reboot everything not
acked is pending again (the gateway dedupes on (node, seq), so a repeat is harmless). Acks and
the ``dropped`` counters live in RAM only: after a reboot, a partly acked segment is sent again.

Flash layout: ``path/NNNNNNNN.seg`` segment files (monotonic numbers), one open-append-close per
put (littlefs commits on close, so a put is atomic there), a file deleted when all its records
are acked. On littlefs an append copies the file's tail block: about one 4 KiB erase and
(size of the segment so far) bytes programmed per put, so segments stay small. A record,
little-endian::

    magic u16 (0x5743) | body length u16 | CRC-32 over (magic, length, body) u32
    body: seq u64 | class u8 | topic length u8 | topic (UTF-8) | payload

A torn or corrupt record ends its segment's valid part (the rest is ignored and the segment is
never appended to again). The RAM index is one ``array('i')`` per segment: a 7-int header
(number, size, flags, base seq in three 30-bit parts, unacked count) then two ints per record:
the seq minus the segment's base, and offset | class << 24 | acked << 26. Every value stays a
small int on a 32-bit port, so a full buffer's index costs a few KB and no long-int objects.

Bound: at most ``max_segments`` files. A put that needs one more drops the oldest segment: its
unacked event/result/other records are copied into the new segment first (if they fit beside
the incoming record), everything else unacked in it is counted in ``dropped`` by class. So bulk
telemetry goes first, oldest first. The copies are committed before the old file is removed; a
restart after a cut in between finds them twice and ignores the old copies.

    buf = Buffer("cwsnet/buf", segment_bytes=4096, max_segments=32)
    seqs = SeqMark("cwsnet/state/seq")
    s = seqs.next(now_ms)
    buf.put(s, TELEMETRY, topic, payload)     # durable when it returns
    for seq, topic in buf.pending(10, skip=in_flight):
        topic, payload = buf.get(seq)
    buf.ack(first, last)                      # per custody range
"""

import os
import struct
from array import array

try:
    from binascii import crc32
except ImportError:  # a port built without it: bitwise CRC-32 (slow, but the same values)

    def crc32(data, crc=0):
        crc ^= 0xFFFFFFFF
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
        return crc ^ 0xFFFFFFFF


TELEMETRY = 0
EVENT = 1
RESULT = 2
OTHER = 3
CLASSES = ("telemetry", "event", "result", "other")

_MAGIC = 0x5743
_HDR = "<HHI"  # magic, body length, crc
_PRE = "<QBB"  # seq, class, topic length
_HDR_LEN = 8
_PRE_LEN = 10
_MAX_BODY = 0xFFFF
_MAX_TOPIC = 255

# per-segment index (array 'i'): header slots, then (delta, info) per record
_NUM = 0
_SIZE = 1
_FLAGS = 2  # bit 0: closed (full, torn, or failed write: never appended to again)
_B2 = 3  # base seq = B2 << 60 | B1 << 30 | B0
_B1 = 4
_B0 = 5
_UNACKED = 6
_E = 7  # first record entry
_LIM = 0x3FFFFFFF  # |delta| <= _LIM is stored inline; every stored value is a 31-bit small int
_BIG = -0x40000000  # delta placeholder: the seq is in Buffer._big (a seq far from the base)
_OFF = 0xFFFFFF
_ACKED = 1 << 26
_CHUNK = 256


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def makedirs(path):
    """Create ``path`` and its parents (``a/b/c``); existing ones are fine."""
    cur = ""
    for part in path.split("/"):
        if not part:
            if not cur:
                cur = "/"
            continue
        cur = cur + part if (not cur or cur.endswith("/")) else cur + "/" + part
        if not _exists(cur):
            try:
                os.mkdir(cur)
            except OSError:
                if not _exists(cur):
                    raise


def _base(s):
    return (s[_B2] << 60) | (s[_B1] << 30) | s[_B0]


def _head(f):
    """(body length, crc, seq, class, topic length, crc so far) of the record at f's position."""
    h = f.read(_HDR_LEN + _PRE_LEN)
    if len(h) < _HDR_LEN + _PRE_LEN:
        return None
    magic, blen, crc = struct.unpack_from(_HDR, h, 0)
    seq, cls, tlen = struct.unpack_from(_PRE, h, _HDR_LEN)
    if magic != _MAGIC or blen < _PRE_LEN + tlen or cls > 3:
        return None
    mv = memoryview(h)
    return (blen, crc, seq, cls, tlen, crc32(mv[_HDR_LEN:], crc32(mv[:4])))


class Buffer:
    """Store-and-forward buffer of sealed messages in segment files under ``path``."""

    def __init__(self, path="cwsnet/buf", segment_bytes=4096, max_segments=32):
        self.path = path
        self.segment_bytes = max(64, min(int(segment_bytes), _OFF))
        self.max_segments = max(1, int(max_segments))
        self.dropped = {"telemetry": 0, "event": 0, "result": 0, "other": 0}
        self._segs = []  # oldest first; the last one is the active segment
        self._big = {}  # (segment number, record index) -> seq, for seqs far from the base
        self._n = 0  # unacked records
        self._next_num = 0
        self._mv = memoryview(bytearray(_CHUNK))  # the one read buffer (CRC checks, copies)
        try:
            makedirs(path)
        except OSError:
            pass
        self._scan()

    # ---- public API ------------------------------------------------------------------------

    def put(self, seq, cls, topic, payload):
        """Append one record and make it durable before returning (raises OSError on flash errors)."""
        if not 0 <= seq < (1 << 64):
            raise ValueError("seq out of range")
        if cls not in (0, 1, 2, 3):
            raise ValueError("class must be 0..3")
        tb = bytes(topic, "utf-8") if isinstance(topic, str) else bytes(topic)
        if len(tb) > _MAX_TOPIC:
            raise ValueError("topic too long")
        blen = _PRE_LEN + len(tb) + len(payload)
        if blen > _MAX_BODY:
            raise ValueError("payload too large")
        rl = _HDR_LEN + blen
        hl = struct.pack("<HH", _MAGIC, blen)
        pre = struct.pack(_PRE, seq, cls, len(tb)) + tb
        crc = crc32(payload, crc32(pre, crc32(hl)))
        head = hl + struct.pack("<I", crc) + pre
        s = self._room(rl, seq)
        off = s[_SIZE]
        f = None
        try:
            f = open(self._name(s[_NUM]), "ab")
            f.write(head)
            f.write(payload)
            f.close()
            f = None
        except BaseException:
            s[_FLAGS] = 1  # whatever reached the file must not have records appended after it
            if f is not None:
                try:
                    f.close()
                except BaseException:
                    pass
            if len(s) == _E and s is self._segs[-1] and self._remove(s):
                self._segs.pop()  # a segment that never got a record
            raise
        self._add(s, seq, cls, off)
        s[_SIZE] = off + rl
        if s[_SIZE] >= self.segment_bytes:
            self._close(len(self._segs) - 1)

    def ack(self, first, last):
        """Mark seqs first..last (inclusive) acked; delete fully acked segments. Returns the count."""
        n = 0
        i = 0
        segs = self._segs
        while i < len(segs):
            s = segs[i]
            if s[_UNACKED]:
                b = _base(s)
                lo = max(first - b, -_LIM)
                hi = min(last - b, _LIM)
                num = s[_NUM]
                for j in range(_E, len(s), 2):
                    info = s[j + 1]
                    if info & _ACKED:
                        continue
                    d = s[j]
                    if d == _BIG:
                        q = self._big[(num, (j - _E) >> 1)]
                        hit = first <= q <= last
                    else:
                        hit = lo <= d <= hi
                    if hit:
                        s[j + 1] = info | _ACKED
                        s[_UNACKED] -= 1
                        n += 1
            if not s[_UNACKED] and self._remove(s):
                del segs[i]
                continue
            i += 1
        self._n -= n
        return n

    def pending(self, limit, skip=(), classes=None):
        """Up to ``limit`` unacked ``(seq, topic)``, oldest segment first, in file order.

        ``skip``: seqs to leave out (any container); ``classes``: only records of these classes.
        """
        out = []
        if limit <= 0:
            return out
        for s in self._segs:
            if not s[_UNACKED]:
                continue
            f = None
            try:
                for j in range(_E, len(s), 2):
                    info = s[j + 1]
                    if info & _ACKED or classes is not None and (info >> 24) & 3 not in classes:
                        continue
                    seq = self._seq(s, j)
                    if skip and seq in skip:
                        continue
                    if f is None:
                        f = open(self._name(s[_NUM]), "rb")
                    t = self._read(f, info & _OFF, seq, False)
                    if t is not None:
                        out.append((seq, t[0]))
                        if len(out) >= limit:
                            return out
            except OSError:
                pass
            finally:
                if f is not None:
                    f.close()
        return out

    def get(self, seq):
        """``(topic, payload)`` of an unacked record, read back from flash (CRC-checked); else None."""
        for s in self._segs:
            if not s[_UNACKED]:
                continue
            d = seq - _base(s)
            inline = -_LIM <= d <= _LIM
            num = s[_NUM]
            for j in range(_E, len(s), 2):
                info = s[j + 1]
                if info & _ACKED:
                    continue
                e = s[j]
                if e == _BIG:
                    if self._big[(num, (j - _E) >> 1)] != seq:
                        continue
                elif not inline or e != d:
                    continue
                try:
                    f = open(self._name(num), "rb")
                    try:
                        t = self._read(f, info & _OFF, seq, True)
                    finally:
                        f.close()
                except OSError:
                    t = None
                if t is not None:
                    return t
        return None

    def __len__(self):
        return self._n

    def bytes(self):
        """Bytes of segment files on flash."""
        n = 0
        for s in self._segs:
            n += s[_SIZE]
        return n

    def segments(self):
        return len(self._segs)

    # ---- internals -------------------------------------------------------------------------

    def _name(self, num):
        return "%s/%08d.seg" % (self.path, num)

    def _seq(self, s, j):
        d = s[j]
        if d == _BIG:
            return self._big[(s[_NUM], (j - _E) >> 1)]
        return _base(s) + d

    def _add(self, s, seq, cls, off):
        d = seq - _base(s)
        if -_LIM <= d <= _LIM:
            s.append(d)
        else:
            self._big[(s[_NUM], (len(s) - _E) >> 1)] = seq
            s.append(_BIG)
        s.append(off | (cls << 24))
        s[_UNACKED] += 1
        self._n += 1

    def _new(self, num, base):
        s = array("i", (num, 0, 0, base >> 60, (base >> 30) & _LIM, base & _LIM, 0))
        return s

    def _close(self, i):
        s = self._segs[i]
        s[_FLAGS] = 1
        self._segs[i] = array("i", s)  # exact size: no append slack kept for closed segments

    def _forget(self, s):
        if self._big:
            num = s[_NUM]
            for k in [k for k in self._big if k[0] == num]:
                del self._big[k]

    def _remove(self, s):
        name = self._name(s[_NUM])
        try:
            os.remove(name)
        except OSError:
            if _exists(name):
                return False
        self._forget(s)
        return True

    def _room(self, rl, seq):
        """The segment the next record (rl bytes) goes to, starting (and bounding) one if needed."""
        if self._segs:
            s = self._segs[-1]
            if not s[_FLAGS] and s[_SIZE] + rl <= self.segment_bytes:
                return s
            if not s[_FLAGS]:
                self._close(len(self._segs) - 1)
        new = self._new(self._next_num, seq)
        self._next_num += 1
        try:
            while self._segs and len(self._segs) >= self.max_segments:
                self._drop_oldest(new, rl)
        finally:
            self._segs.append(new)
        return self._segs[-1]

    def _drop_oldest(self, new, reserve):
        """Delete the oldest segment, moving its unacked non-telemetry records into ``new``."""
        old = self._segs[0]
        num = old[_NUM]
        src = dst = None
        try:
            for j in range(_E, len(old), 2):
                info = old[j + 1]
                if info & _ACKED:
                    continue
                cls = (info >> 24) & 3
                moved = False
                if cls != TELEMETRY:
                    seq = self._seq(old, j)
                    off = info & _OFF
                    try:
                        if src is None:
                            src = open(self._name(num), "rb")
                        rl = self._check(src, off, seq)
                        if rl and new[_SIZE] + rl + reserve <= self.segment_bytes:
                            if dst is None:
                                dst = open(self._name(new[_NUM]), "ab")
                            self._copy(src, off, rl, dst)
                            self._add(new, seq, cls, new[_SIZE])
                            new[_SIZE] += rl
                            moved = True
                    except OSError:
                        new[_FLAGS] = 1
                        raise
                if not moved:
                    self.dropped[CLASSES[cls]] += 1
                old[j + 1] = info | _ACKED
                old[_UNACKED] -= 1
                self._n -= 1
            if dst is not None:
                d, dst = dst, None
                try:
                    d.close()  # the copies are committed before the old segment goes
                except OSError:
                    new[_FLAGS] = 1
                    raise
        finally:
            if src is not None:
                src.close()
            if dst is not None:
                try:
                    dst.close()
                except OSError:
                    pass
        self._remove(old)
        del self._segs[0]

    def _check(self, f, off, seq):
        """Length of the CRC-valid record at ``off`` carrying ``seq``, else 0."""
        f.seek(off)
        t = _head(f)
        if t is None or t[2] != seq or self._crc_span(f, t[0] - _PRE_LEN, t[5]) != t[1]:
            return 0
        return _HDR_LEN + t[0]

    def _crc_span(self, f, n, c):
        mv = self._mv
        while n > 0:
            got = f.readinto(mv[:n] if n < _CHUNK else mv)
            if not got:
                return None
            c = crc32(mv[:got], c)
            n -= got
        return c

    def _copy(self, src, off, rl, dst):
        src.seek(off)
        mv = self._mv
        while rl > 0:
            got = src.readinto(mv[:rl] if rl < _CHUNK else mv)
            if not got:
                raise OSError(5)
            dst.write(mv[:got])
            rl -= got

    def _read(self, f, off, seq, payload):
        """(topic, payload or None) of the record at ``off`` if it carries ``seq``, else None."""
        f.seek(off)
        t = _head(f)
        if t is None or t[2] != seq:
            return None
        tb = f.read(t[4])
        if len(tb) < t[4]:
            return None
        p = None
        if payload:
            n = t[0] - _PRE_LEN - t[4]
            p = f.read(n)
            if len(p) != n or crc32(p, crc32(tb, t[5])) != t[1]:
                return None
        return (str(tb, "utf-8"), p)

    def _scan(self):
        try:
            names = os.listdir(self.path)
        except OSError:
            names = []
        nums = []
        for name in names:
            if len(name) == 12 and name.endswith(".seg") and name[:8].isdigit():
                nums.append(int(name[:8]))
        nums.sort()
        for num in nums:
            try:
                s = self._load(num)
            except (OSError, ValueError):  # unreadable (not bad data: that ends a segment)
                self._forget(self._new(num, 0))
                s = None
            if s is None:
                continue
            if len(s) == _E:  # nothing valid in it: garbage or an empty file
                self._remove(s)
                continue
            self._segs.append(s)
        if nums:
            self._next_num = nums[-1] + 1
        segs = self._segs
        if len(segs) > 1 and segs[0][_UNACKED]:
            # a cut after records were moved out of the oldest segment (committed in the newest)
            # but before its removal: the copies in the oldest are the duplicates
            last = segs[-1]
            moved = set(self._seq(last, j) for j in range(_E, len(last), 2))
            s = segs[0]
            for j in range(_E, len(s), 2):
                if not s[j + 1] & _ACKED and self._seq(s, j) in moved:
                    s[j + 1] |= _ACKED
                    s[_UNACKED] -= 1
            if not s[_UNACKED] and self._remove(s):
                del segs[0]
        self._n = 0
        for s in self._segs:
            self._n += s[_UNACKED]
        for i in range(len(self._segs)):
            s = self._segs[i]
            if i < len(self._segs) - 1 or s[_SIZE] >= self.segment_bytes:
                s[_FLAGS] = 1

    def _load(self, num):
        name = self._name(num)
        size = os.stat(name)[6]
        s = None
        off = 0
        f = open(name, "rb")
        try:
            while off < size and off <= _OFF:
                t = _head(f)
                if t is None or self._crc_span(f, t[0] - _PRE_LEN, t[5]) != t[1]:
                    break
                if s is None:
                    s = self._new(num, t[2])
                self._add(s, t[2], t[3], off)
                off += _HDR_LEN + t[0]
        finally:  # an OSError (a read failing, not bad data) leaves the segment out, file kept
            f.close()
        if s is None:
            s = self._new(num, 0)
        s[_SIZE] = size
        if off != size:  # torn or corrupt tail: never append after it
            s[_FLAGS] = 1
        return array("i", s)


_CLOCK_SET = 1577836800000  # 2020-01-01 in ms: below it the wall clock is not set yet


def _read_mark(path):
    try:
        f = open(path, "r")
        try:
            t = f.read(64)
        finally:
            f.close()
        v, c = t.split()
        if crc32(bytes(v, "ascii")) != int(c):
            return 0
        v = int(v)
        return v if 0 <= v < (1 << 63) else 0
    except Exception:
        return 0


class SeqMark:
    """Durable per-node sequence counter: strictly increasing across restarts, never reused.

    The file holds a reservation R: every seq handed out is below the stored R. ``next`` writes
    a new reservation (``seq + block``, temp file then rename, so a power cut leaves the old or
    the new one) only when the reserved block is used up: one flash write per ``block`` messages,
    plus one at the first call of each run. A run starts at the stored R and jumps once to the
    wall clock (ms) the first time ``now_ms`` looks set (>= 2020): docs/protocol.md §2's
    max(durable mark, wall clock), which also covers a node whose state was wiped. A clock
    that is unset (0, small) or behind the mark is ignored.
    """

    def __init__(self, path="cwsnet/state/seq", block=1000):
        self.path = path
        self.block = max(1, int(block))
        d = path.rsplit("/", 1)[0] if "/" in path else ""
        if d:
            try:
                makedirs(d)
            except OSError:
                pass
        # a temp file left by a cut before its rename holds a reservation >= the old one: safe
        self.mark = max(_read_mark(path), _read_mark(path + ".tmp"), 1)
        self._next = self.mark
        self._limit = self.mark  # nothing is reserved for this run yet
        self._clock = False

    def next(self, now_ms=0):
        s = self._next
        if not self._clock and now_ms >= _CLOCK_SET:
            self._clock = True
            if now_ms > s:
                s = int(now_ms)
        if s >= self._limit:
            self._persist(s + self.block)
        self._next = s + 1
        return s

    def _persist(self, v):
        tmp = self.path + ".tmp"
        t = str(v)
        f = open(tmp, "w")
        try:
            f.write("%s %d\n" % (t, crc32(bytes(t, "ascii"))))
        finally:
            f.close()
        try:
            os.rename(tmp, self.path)
        except OSError:  # a filesystem that will not rename over a file
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.rename(tmp, self.path)
        self.mark = v
        self._limit = v
