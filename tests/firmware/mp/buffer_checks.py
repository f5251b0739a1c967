# cws.buffer's checks (offline buffer + SeqMark), run unchanged on MicroPython's unix port, its
# 32-bit WebAssembly port (in-memory FS) and CPython. Needs on the path: firmware/micropython/lib
# and fw_bufenv (ROOT: a scratch directory, written by tests/test_firmware_buffer.py).
# Any failure raises; success prints "OK ..." with counts.
import os

from cws.buffer import Buffer, SeqMark, makedirs

import fw_bufenv

T0 = 1767225600000  # 2026-01-01 in ms: seqs are long ints on a 32-bit port
TOPIC = "cws/v1/site-1/esp-1/telemetry/env"
COUNTS = {}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def count(name, n=1):
    COUNTS[name] = COUNTS.get(name, 0) + n


def isdir(p):
    try:
        return (os.stat(p)[0] & 0o170000) == 0o040000
    except OSError:
        return False


def rmtree(p):
    if isdir(p):
        for n in os.listdir(p):
            rmtree(p + "/" + n)
        os.rmdir(p)
    else:
        try:
            os.remove(p)
        except OSError:
            pass


def fresh(name):
    d = fw_bufenv.ROOT + "/" + name
    rmtree(d)
    makedirs(d)
    return d


def rd(p):
    f = open(p, "rb")
    try:
        return f.read()
    finally:
        f.close()


def wr(p, data):
    f = open(p, "wb")
    try:
        f.write(data)
    finally:
        f.close()


def segfiles(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".seg"))


def payload_for(seq, n):
    # deterministic bytes from the seq: any mix-up between records shows
    out = bytearray(n)
    x = seq & 0x3FFFFFF
    for i in range(n):
        x = (x * 1103515 + 12345) & 0x3FFFFFF
        out[i] = (x >> 16) & 0xFF
    return bytes(out)


def rec_len(topic, payload):
    return 8 + 10 + len(bytes(topic, "utf-8")) + len(payload)


def seqs_of(b, limit=100000):
    return [s for s, _ in b.pending(limit)]


def same_content(b, expect):
    # every pending record reads back exactly as put
    for seq, topic in b.pending(100000):
        check(seq in expect, "unknown seq %d pending" % seq)
        t, p = expect[seq]
        check(topic == t, "topic of %d" % seq)
        got = b.get(seq)
        check(got is not None and got[0] == t and got[1] == p, "content of %d" % seq)
        count("get")


# ---- round trips ------------------------------------------------------------------------------

def check_roundtrip():
    d = fresh("rt")
    b = Buffer(d + "/buf", 4096, 32)
    check(len(b) == 0 and b.pending(10) == [] and b.bytes() == 0, "empty")
    check(b.dropped == {"telemetry": 0, "event": 0, "result": 0, "other": 0}, "dropped keys")
    expect = {}
    order = []
    sizes = [0, 1, 17, 200, 1000, 3000, 4000, 8000, 5, 64]
    topics = [TOPIC, "cws/v1/site-1/esp-1/event/door", "cws/v1/site-1/esp-1/task/result", "t/ünï"]
    for i in range(40):
        seq = T0 + i * 3
        t = topics[i % 4]
        p = payload_for(seq, sizes[i % len(sizes)])
        b.put(seq, i % 4, t, p)
        expect[seq] = (t, p)
        order.append(seq)
    check(len(b) == 40, "len after puts")
    check(seqs_of(b) == order, "pending in put order")
    check(seqs_of(b, 7) == order[:7], "pending limit")
    check(b.pending(0) == [], "pending(0)")
    skip = set(order[::2])
    check(seqs_of_skip(b, 5, skip) == [s for s in order if s not in skip][:5], "pending skip")
    same_content(b, expect)
    total = 0
    for n in segfiles(d + "/buf"):
        total += os.stat(d + "/buf/" + n)[6]
    check(b.bytes() == total, "bytes() matches the files")
    check(b.get(T0 + 1) is None and b.get(0) is None and b.get(T0 + 10 ** 9) is None, "get unknown")
    # bytearray / memoryview payloads
    b.put(T0 + 500, 0, TOPIC, bytearray(b"abc"))
    b.put(T0 + 501, 0, TOPIC, memoryview(b"xyzw")[1:])
    expect[T0 + 500] = (TOPIC, b"abc")
    expect[T0 + 501] = (TOPIC, b"yzw")
    check(b.get(T0 + 500) == (TOPIC, b"abc") and b.get(T0 + 501) == (TOPIC, b"yzw"), "buffer payloads")
    check(b.ack(T0 + 500, T0 + 501) == 2, "ack the two")
    # ranges with gaps: ack every other record by single-seq ranges, unknown seqs ignored
    n = 0
    for s in order[::2]:
        n += b.ack(s, s)
    check(n == 20 and len(b) == 20, "gapped acks: %d, len %d" % (n, len(b)))
    check(b.ack(T0 + 1, T0 + 1) == 0 and b.ack(order[0], order[0]) == 0, "unknown / repeated acks")
    check(b.ack(10, 20) == 0 and b.ack(T0 + 10 ** 12, T0 + 10 ** 13) == 0, "far acks")
    check(b.ack(order[5], order[1]) == 0, "empty range")
    check(seqs_of(b) == order[1::2], "odd ones pending")
    for s in order[::2]:
        check(b.get(s) is None, "acked record not returned by get")
    # a range over a gap acks only what exists
    check(b.ack(order[0], order[9]) == 5, "range over gaps")
    check(seqs_of(b) == order[11::2], "after the range")
    same_content(b, expect)
    # restart: the unacked records are all there (acked ones of surviving segments may reappear)
    unacked = set(order[11::2])
    b2 = Buffer(d + "/buf", 4096, 32)
    got = set(seqs_of(b2))
    check(unacked <= got and got <= set(expect), "restart keeps the unacked records")
    same_content(b2, expect)
    # ack everything: every segment file goes, the directory is empty
    check(b.ack(0, 1 << 63) == len(unacked), "ack all")
    check(len(b) == 0 and segfiles(d + "/buf") == [] and b.bytes() == 0, "all segments deleted")
    b.put(T0 + 1000, 1, TOPIC, b"again")  # a new active segment starts after the last was deleted
    check(seqs_of(b) == [T0 + 1000] and len(segfiles(d + "/buf")) == 1, "new segment after deletes")
    b3 = Buffer(d + "/buf", 4096, 32)
    check(seqs_of(b3) == [T0 + 1000] and b3.get(T0 + 1000) == (TOPIC, b"again"), "restart after deletes")
    count("roundtrip")


def seqs_of_skip(b, limit, skip):
    return [s for s, _ in b.pending(limit, skip)]


def check_restart_exact():
    # acks that cover whole segments: a restart shows exactly the unacked records
    d = fresh("rx")
    p = payload_for(1, 100)
    rl = rec_len(TOPIC, p)
    per = 4
    b = Buffer(d + "/buf", rl * per, 32)
    expect = {}
    for i in range(40):
        b.put(T0 + i, 0, TOPIC, p)
        expect[T0 + i] = (TOPIC, p)
    check(len(segfiles(d + "/buf")) == 10, "10 segments of 4")
    check(b.ack(T0 + 4, T0 + 11) == 8 and b.ack(T0 + 20, T0 + 23) == 4, "whole-segment acks")
    check(b.ack(T0 + 36, T0 + 39) == 4, "ack the active segment")
    check(len(segfiles(d + "/buf")) == 6, "acked segments deleted (active too)")
    left = [T0 + i for i in range(40) if not (4 <= i <= 11 or 20 <= i <= 23 or i >= 36)]
    b2 = Buffer(d + "/buf", rl * per, 32)
    check(seqs_of(b2) == left and len(b2) == len(left), "restart: exactly the unacked records")
    same_content(b2, expect)
    b2.put(T0 + 100, 0, TOPIC, p)
    check(segfiles(d + "/buf")[-1] == "00000009.seg", "numbering continues after the last file")
    count("restart")


# ---- segments, bound, drop policy -------------------------------------------------------------

def check_segments():
    d = fresh("seg")
    p = payload_for(2, 50)
    rl = rec_len(TOPIC, p)
    b = Buffer(d + "/buf", rl * 3 + 5, 100)
    for i in range(7):
        b.put(T0 + i, 0, TOPIC, p)
    check(segfiles(d + "/buf") == ["00000000.seg", "00000001.seg", "00000002.seg"], "3 per segment")
    check(os.stat(d + "/buf/00000000.seg")[6] == rl * 3, "segment size")
    big = payload_for(3, rl * 5)
    b.put(T0 + 7, 1, TOPIC, big)  # bigger than segment_bytes: a segment of its own
    b.put(T0 + 8, 0, TOPIC, p)
    files = segfiles(d + "/buf")
    check(len(files) == 5, "big record alone: %r" % (files,))
    check(os.stat(d + "/buf/" + files[3])[6] == rec_len(TOPIC, big), "big segment holds one record")
    check(b.get(T0 + 7) == (TOPIC, big), "big record reads back")
    # restart: the active segment keeps filling
    b2 = Buffer(d + "/buf", rl * 3 + 5, 100)
    b2.put(T0 + 9, 0, TOPIC, p)
    check(len(segfiles(d + "/buf")) == 5, "appended to the active segment after restart")
    # the whole buffer round-trips across seqs far apart (beyond the inline delta range)
    far = [3, T0, T0 + (1 << 31), T0 + (1 << 40), (1 << 63) - 5, T0 + 1, 4]
    e = fresh("far")
    b = Buffer(e + "/buf", 100000, 4)
    for s in far:
        b.put(s, 2, TOPIC, payload_for(s, 9))
    check(seqs_of(b) == far, "far seqs pending")
    for s in far:
        check(b.get(s) == (TOPIC, payload_for(s, 9)), "far seq get")
    check(b.ack(T0 + (1 << 31), T0 + (1 << 40)) == 2 and b.ack(3, 3) == 1, "far acks")
    check(seqs_of(Buffer(e + "/buf", 100000, 4)) == far, "far seqs after restart")
    check(b.ack(0, 1 << 64) == 4 and segfiles(e + "/buf") == [], "far: all acked")
    count("segments")


def check_bound():
    d = fresh("bound")
    p = payload_for(4, 40)
    rl = rec_len(TOPIC, p)
    seg = rl * 4
    b = Buffer(d + "/buf", seg, 3)
    # 3 segments of telemetry, one event in the first
    for i in range(12):
        b.put(T0 + i, 1 if i == 1 else 0, TOPIC, p)
    check(len(segfiles(d + "/buf")) == 3, "3 segments")
    b.ack(T0 + 2, T0 + 2)  # an acked record is not a drop
    b.put(T0 + 12, 0, TOPIC, p)  # needs a 4th: the oldest goes, its event moves
    check(len(segfiles(d + "/buf")) == 3, "bounded at 3 files")
    check(b.dropped == {"telemetry": 2, "event": 0, "result": 0, "other": 0}, "drops %r" % (b.dropped,))
    s = seqs_of(b)
    check(T0 + 1 in s and T0 not in s and T0 + 3 not in s, "event kept, telemetry dropped")
    check(s == [T0 + i for i in range(4, 12)] + [T0 + 1, T0 + 12], "order after the move: %r" % (s,))
    check(b.get(T0 + 1) == (TOPIC, p), "moved event reads back")
    check(len(b) == 10, "len after drop")
    # restart sees the same
    check(seqs_of(Buffer(d + "/buf", seg, 3)) == s, "restart after drop")
    # a segment full of events/results: what does not fit next to the incoming record is dropped
    for i in range(13, 40):
        b.put(T0 + i, (i % 3) + 1, TOPIC, p)
    check(len(segfiles(d + "/buf")) == 3, "still 3 files")
    dr = b.dropped
    kept = seqs_of(b)
    check(len(b) == len(kept) and len(kept) <= 12, "bounded content")
    puts = 40
    check(dr["telemetry"] + dr["event"] + dr["result"] + dr["other"] + len(kept) + 1 == puts,
          "every record is pending, acked or counted: %r %d" % (dr, len(kept)))
    check(dr["telemetry"] == 11, "all old telemetry dropped first: %r" % (dr,))
    check(all(k == T0 + 1 or k > T0 + 12 for k in kept), "no telemetry kept: %r" % (kept,))
    for k in kept:
        check(b.get(k) == (TOPIC, p), "kept record content")
    # oversized incoming record: nothing else fits, the old segment's records are all counted
    e = fresh("bound2")
    b = Buffer(e + "/buf", seg, 2)
    for i in range(8):
        b.put(T0 + i, 1, TOPIC, p)
    b.put(T0 + 8, 2, TOPIC, payload_for(5, seg * 2))
    check(b.dropped["event"] == 4 and len(segfiles(e + "/buf")) == 2, "oversized: %r" % (b.dropped,))
    check(seqs_of(b) == [T0 + 4, T0 + 5, T0 + 6, T0 + 7, T0 + 8], "oversized kept")
    # max_segments=1: the only segment is recycled, its events first
    e = fresh("bound1")
    b = Buffer(e + "/buf", seg, 1)
    for i in range(6):
        b.put(T0 + i, 1 if i < 2 else 0, TOPIC, p)
    check(len(segfiles(e + "/buf")) == 1, "one file")
    check(seqs_of(b) == [T0, T0 + 1, T0 + 4, T0 + 5], "single segment recycled: %r" % (seqs_of(b),))
    check(b.dropped["telemetry"] == 2, "single: dropped")
    count("bound")


def check_cut_during_drop():
    # a power cut after the moved records were committed to the new segment, before the oldest
    # segment was removed: the restart sees both files and keeps one copy of each record
    d = fresh("cutdrop")
    path = d + "/buf"
    p = payload_for(6, 40)
    seg = rec_len(TOPIC, p) * 4
    b = Buffer(path, seg, 3)
    for i in range(12):
        b.put(T0 + i, 1 if i == 1 else 0, TOPIC, p)
    old = rd(path + "/00000000.seg")
    b.put(T0 + 12, 0, TOPIC, p)
    check(segfiles(path) == ["00000001.seg", "00000002.seg", "00000003.seg"], "dropped")
    wr(path + "/00000000.seg", old)  # the removal never happened
    b = Buffer(path, seg, 3)
    s = seqs_of(b)
    check(s == [T0, T0 + 2, T0 + 3] + [T0 + i for i in range(4, 12)] + [T0 + 1, T0 + 12], "dedupe: %r" % (s,))
    check(len(b) == 13, "len without duplicates")
    b.put(T0 + 13, 0, TOPIC, p)
    b.put(T0 + 14, 0, TOPIC, p)
    check(len(segfiles(path)) == 4 and b.dropped["telemetry"] == 0, "the active segment fills")
    b.put(T0 + 15, 0, TOPIC, p)  # needs a new segment: back to the bound (two oldest go)
    check(len(segfiles(path)) == 3 and b.dropped["telemetry"] == 7, "bound again: %r" % (b.dropped,))
    check(seqs_of(b).count(T0 + 1) == 1, "the event once")
    count("cutdrop")


# ---- torn tails, corruption, foreign files ----------------------------------------------------

def check_torn():
    d = fresh("torn")
    path = d + "/buf"
    seqs = [T0 + 10, T0 + 11, T0 + 12]
    pl = [payload_for(s, 30 + 11 * i) for i, s in enumerate(seqs)]
    b = Buffer(path, 4096, 8)
    for s, p in zip(seqs, pl):
        b.put(s, 0, TOPIC, p)
    name = path + "/" + segfiles(path)[0]
    good = rd(name)
    last = len(good) - rec_len(TOPIC, pl[2])
    expect = {seqs[0]: (TOPIC, pl[0]), seqs[1]: (TOPIC, pl[1]), seqs[2]: (TOPIC, pl[2])}
    # cut exactly after the second record: a clean end, the segment stays active
    wr(name, good[:last])
    b = Buffer(path, 4096, 8)
    check(seqs_of(b) == seqs[:2], "cut at a record boundary")
    b.put(T0 + 20, 0, TOPIC, b"after")
    check(len(segfiles(path)) == 1 and seqs_of(Buffer(path, 4096, 8)) == seqs[:2] + [T0 + 20], "clean end")
    # truncated at every byte inside the last record
    for cut in range(last + 1, len(good)):
        wr(name, good[:cut])
        b = Buffer(path, 4096, 8)
        check(seqs_of(b) == seqs[:2], "truncated at %d" % cut)
        same_content(b, expect)
        b.put(T0 + 20, 0, TOPIC, b"after")  # goes to a new segment, never after the garbage
        check(len(segfiles(path)) == 2, "new segment after a torn tail")
        b2 = Buffer(path, 4096, 8)
        check(seqs_of(b2) == seqs[:2] + [T0 + 20], "restart after torn tail")
        check(b2.get(T0 + 20) == (TOPIC, b"after"), "record after torn tail")
        os.remove(path + "/" + segfiles(path)[1])
        count("truncations")
    # a flipped byte anywhere in the last record
    for i in range(last, len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x41
        wr(name, bad)
        b = Buffer(path, 4096, 8)
        check(seqs_of(b) == seqs[:2], "flipped byte %d" % i)
        same_content(b, expect)
        count("flips")
    # a flip in the first record: nothing of that segment is trusted, the file goes
    bad = bytearray(good)
    bad[20] ^= 1
    wr(name, bad)
    b = Buffer(path, 4096, 8)
    check(len(b) == 0 and segfiles(path) == [], "corrupt first record")
    # garbage appended after good records (a torn append on a non-atomic filesystem)
    wr(name, good + b"\x43\x57\xff\xff")
    b = Buffer(path, 4096, 8)
    check(seqs_of(b) == seqs and b.bytes() == len(good) + 4, "garbage tail")
    b.put(T0 + 30, 0, TOPIC, b"x")
    check(len(segfiles(path)) == 2 and seqs_of(Buffer(path, 4096, 8)) == seqs + [T0 + 30], "no append after garbage")
    # a record changed on flash after the scan: get refuses it (CRC), pending stays consistent
    e = fresh("rot")
    b = Buffer(e + "/buf", 4096, 8)
    b.put(T0, 0, TOPIC, b"payload-one")
    b.put(T0 + 1, 0, TOPIC, b"payload-two")
    n = e + "/buf/" + segfiles(e + "/buf")[0]
    bad = bytearray(rd(n))
    bad[len(bad) - 2] ^= 0x10
    wr(n, bad)
    check(b.get(T0 + 1) is None and b.get(T0) == (TOPIC, b"payload-one"), "rot caught by get")
    # foreign files and directories are ignored; a missing directory (and parents) is created
    e = fresh("foreign")
    makedirs(e + "/buf/sub")
    wr(e + "/buf/notes.txt", b"hello")
    wr(e + "/buf/abcdefgh.seg", b"\x00" * 40)
    wr(e + "/buf/123.seg", b"\x00" * 40)
    wr(e + "/buf/00000007.seg.tmp", b"\x00" * 40)
    b = Buffer(e + "/buf", 4096, 8)
    check(len(b) == 0, "foreign files ignored")
    b.put(T0, 0, TOPIC, b"q")
    check(b.get(T0) == (TOPIC, b"q"), "works beside foreign files")
    check(rd(e + "/buf/notes.txt") == b"hello" and len(os.listdir(e + "/buf")) == 6, "foreign files untouched")
    b = Buffer(e + "/new/deep/buf", 4096, 8)
    b.put(T0, 0, TOPIC, b"q")
    check(seqs_of(Buffer(e + "/new/deep/buf")) == [T0], "parents created")
    # a segment name that is a directory: no crash
    makedirs(e + "/dirseg/buf/00000003.seg")
    b = Buffer(e + "/dirseg/buf", 4096, 8)
    check(len(b) == 0, "directory named like a segment")
    # random garbage of every small length: construction never raises, nothing is returned
    e = fresh("garbage")
    makedirs(e + "/buf")
    for n in range(0, 120, 7):
        wr(e + "/buf/00000001.seg", payload_for(n, n))
        b = Buffer(e + "/buf", 4096, 8)
        check(len(b) == 0, "garbage of %d bytes" % n)
    count("torn")


# ---- SeqMark ------------------------------------------------------------------------------------

def check_seqmark():
    d = fresh("seq")
    path = d + "/state/seq"
    m = SeqMark(path, block=10)
    handed = []
    handed.append(m.next(0))  # clock not set: from the (empty) mark
    check(handed[0] >= 1, "positive seq")
    handed.append(m.next(5))
    handed.append(m.next(T0))  # the clock is set: jump once to it
    check(handed[-1] == T0, "jumps to the wall clock")
    for i in range(25):
        handed.append(m.next(T0 + 5))  # later clock values no longer matter
    check(handed == sorted(handed) and len(set(handed)) == len(handed), "strictly increasing")
    check(handed[-1] == T0 + 25, "one by one after the jump")
    writes = []
    last = None
    # the stored reservation moves only once per block
    m = SeqMark(path, block=10)
    for i in range(35):
        s = m.next(0)
        check(s > handed[-1], "restart with unset clock: above everything handed out")
        handed.append(s)
        v = rd(path)
        if v != last:
            writes.append(i)
            last = v
    check(writes == [0, 10, 20, 30], "a write per block: %r" % (writes,))
    # many restarts, clock behind the mark, some calls each
    for r in range(30):
        m = SeqMark(path, block=7)
        for i in range(r % 9):
            s = m.next(T0 - 10 ** 6 if r % 2 else r)
            check(s > handed[-1], "restart %d: %d after %d" % (r, s, handed[-1]))
            handed.append(s)
    # clock ahead of the mark: the run starts at the clock
    m = SeqMark(path, block=7)
    s = m.next(T0 + 10 ** 9)
    check(s == T0 + 10 ** 9, "clock ahead")
    handed.append(s)
    # a temp file left by a cut before the rename: a valid one is honoured, garbage ignored
    m = SeqMark(path, block=7)
    s = m.next(0)
    check(s > handed[-1], "after clock ahead")
    handed.append(s)
    wr(path + ".tmp", b"garbage")
    m = SeqMark(path, block=7)
    s = m.next(0)
    check(s > handed[-1], "garbage tmp")
    handed.append(s)
    wr(path + ".tmp", rd(path).replace(b" ", b"0 ", 1))  # x10 but the crc no longer matches
    m = SeqMark(path, block=7)
    check(m.next(0) > s, "bad-crc tmp ignored")
    # wiped state: starts at the wall clock
    rmtree(d + "/state")
    m = SeqMark(path, block=7)
    check(m.next(T0 + 10 ** 10) == T0 + 10 ** 10, "wiped state")
    check(len(set(handed)) == len(handed), "never reused")
    count("seqmark", len(handed))


check_roundtrip()
check_restart_exact()
check_segments()
check_bound()
check_cut_during_drop()
check_torn()
check_seqmark()
print("OK " + " ".join("%s=%d" % (k, COUNTS[k]) for k in sorted(COUNTS)))
