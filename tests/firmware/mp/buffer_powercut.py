# Power cuts on littlefs (MicroPython unix port: os.VfsLfs2 on a RAM block device, 64 x 4 KiB).
#
# A deterministic workload (puts of telemetry/events/results from a SeqMark, gapped acks, a
# restart, drops at the segment bound) runs once on a block device that logs every erase and
# program. A cut before write N leaves exactly the first N writes on flash, so the image at every
# cut point is rebuilt from the log (and a second image with write N half done: a torn program or
# erase); a fresh VfsLfs2 is mounted on each and the invariants are checked:
#   - every record pending in RAM both before and after the operation the cut interrupted (so
#     its put() had returned, and neither an ack nor the drop policy was freeing it) is pending
#     after remount, and nothing else than what was put shows up;
#   - every pending record reads back byte for byte (topic and payload);
#   - a SeqMark after remount hands out seqs above every seq handed out before the cut (even
#     with the wall clock unset or behind);
#   - the remounted buffer keeps working (a put after remount is found by a second remount).
# A few cuts are also taken the direct way: the device raises PowerCut at write N, the workload
# stops there, and the same checks run on a fresh mount of what was written.
# Prints "OK ..." with counts and the flash writes per put.
import gc
import os

from cws.buffer import Buffer, SeqMark

BS = 4096
NBLOCKS = 64
T0 = 1767225600000
NOPS = 100
MNT = "/flash"
TOPICS = ("cws/v1/s/esp-1/telemetry/env", "cws/v1/s/esp-1/event/door", "cws/v1/s/esp-1/task/result")
COUNTS = {}


class PowerCut(Exception):
    pass


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Flash:
    """Block device (extended protocol) that logs writes and can die at the N-th one."""

    def __init__(self, data, log=None, cut_at=-1):
        self.data = data
        self.log = log
        self.cut_at = cut_at
        self.writes = 0
        self.dead = False  # after the cut: writes go nowhere (open files closed later by the GC)

    def readblocks(self, block, buf, off=0):
        a = block * BS + off
        buf[:] = memoryview(self.data)[a:a + len(buf)]

    def _op(self, addr, data):
        if self.cut_at >= 0 and self.writes >= self.cut_at:
            half = len(data) // 2
            self.data[addr:addr + half] = data[:half]  # the cut lands mid-write
            self.dead = True
            raise PowerCut()
        self.writes += 1
        if self.log is not None:
            self.log.append((addr, data))
        self.data[addr:addr + len(data)] = data

    def writeblocks(self, block, buf, off=0):
        if self.dead:
            return 0
        self._op(block * BS + (off or 0), bytes(buf))

    def ioctl(self, op, arg):
        if op == 4:
            return NBLOCKS
        if op == 5:
            return BS
        if op == 6 and not self.dead:
            self._op(arg * BS, ERASED)
        return 0


ERASED = b"\xff" * BS


def mount(dev):
    try:
        os.umount(MNT)
    except OSError:
        pass
    os.mount(os.VfsLfs2(dev), MNT)
    os.chdir(MNT)


def unmount():
    os.chdir("/")
    try:
        os.umount(MNT)
    except OSError:
        pass


class Rand:
    def __init__(self, seed):
        self.x = seed

    def below(self, n):
        self.x = (self.x * 1103515245 + 12345) & 0x3FFFFFFF
        return (self.x >> 8) % n


def payload_for(seq, n):
    out = bytearray(n)
    x = seq & 0x3FFFFFF
    for i in range(n):
        x = (x * 1103515 + 12345) & 0x3FFFFFF
        out[i] = (x >> 16) & 0xFF
    return bytes(out)


def open_buffer():
    return Buffer("cws/buf", 1024, 3)


def open_mark():
    return SeqMark("cws/state/seq", 4)


def pending_seqs(b):
    return tuple(s for s, _ in b.pending(10000))


def workload(dev, ops_out, info, drops=None, nops=NOPS):
    """Runs the workload; ops_out gets (start write, end write, pending after or None, max seq
    handed out, kind) per step."""
    r = Rand(7)
    b = open_buffer()
    m = open_mark()
    if drops is not None:
        drops.append(b.dropped)
    top = 0
    ops_out.append((0, dev.writes, pending_seqs(b), top, "open"))
    for i in range(nops):
        start = dev.writes
        k = r.below(10)
        kind = "ack"
        if i == NOPS // 2:  # a restart in the middle: RAM acks are forgotten, flash is rescanned
            b = open_buffer()
            m = open_mark()
            if drops is not None:
                drops.append(b.dropped)
            kind = "restart"
        elif k < (8 if i < NOPS // 2 else 6) or len(b) < 3:
            now = 0 if i < 6 else (T0 - 5000 if i < 12 else T0 + i * 1000)
            seq = m.next(now)
            cls = (0, 0, 0, 1, 2)[r.below(5)]
            n = 20 + r.below(360)
            info[seq] = (TOPICS[min(cls, 2)], n, cls)
            top = seq
            ops_out.append((start, dev.writes, None, top, "seq"))  # the seq is handed out: a step
            start = dev.writes
            b.put(seq, cls, TOPICS[min(cls, 2)], payload_for(seq, n))
            kind = "put"
        else:
            p = pending_seqs(b)
            a = r.below(len(p))
            z = min(len(p) - 1, a + r.below(4))
            if r.below(2):
                b.ack(p[a], p[z])  # a range (covering whatever is between)
            else:
                for j in range(a, z + 1, 2):  # single seqs with gaps
                    b.ack(p[j], p[j])
        ops_out.append((start, dev.writes, pending_seqs(b), top, kind))
    return b


def verify(img, ops, info, cut, label):
    """Mount a copy of img (flash after a cut before write `cut`) and check the invariants."""
    # the last op that completed before the cut, and the one the cut interrupted
    before = None
    during = None
    top = 0
    for st, en, pend, t, _ in ops:
        if en <= cut:
            if pend is not None:
                before = pend
            top = t
        elif st <= cut:
            during = pend
            break
    need = set(before or ())
    if during is not None:
        need = need & set(during)
    dev = Flash(bytearray(img))
    mount(dev)
    try:
        b = open_buffer()
        got = pending_seqs(b)
        check(len(set(got)) == len(got) == len(b), "%s: cut %d duplicates %r" % (label, cut, got))
        for s in need:
            check(s in got, "%s: cut %d lost seq %d" % (label, cut, s))
        for s in got:
            check(s in info, "%s: cut %d unknown seq %d" % (label, cut, s))
            t, n, _ = info[s]
            check(b.get(s) == (t, payload_for(s, n)), "%s: cut %d wrong content for %d" % (label, cut, s))
        m = open_mark()
        s1 = m.next(0)
        check(s1 > top, "%s: cut %d seq %d reused (handed out up to %d)" % (label, cut, s1, top))
        s2 = m.next(T0 - 10 ** 6)
        check(s2 > s1, "%s: clock behind" % label)
        # the remounted filesystem keeps working
        b.put(s2, 1, TOPICS[1], b"after the cut")
        still = pending_seqs(b)  # (that put may have dropped old telemetry at the bound)
        b2 = open_buffer()
        check(b2.get(s2) == (TOPICS[1], b"after the cut"), "%s: cut %d put after remount" % (label, cut))
        for s in still:
            check(b2.get(s) is not None, "%s: cut %d lost %d on the second remount" % (label, cut, s))
        check(open_mark().next(0) > s2, "%s: second remount seq" % label)
    finally:
        unmount()
    COUNTS[label] = COUNTS.get(label, 0) + 1


_copy = Buffer._copy


def _counting_copy(self, src, off, rl, dst):
    COUNTS["moved"] = COUNTS.get("moved", 0) + 1
    _copy(self, src, off, rl, dst)


def main():
    Buffer._copy = _counting_copy  # counts records moved out of a dropped segment
    base = bytearray(NBLOCKS * BS)
    fmt = Flash(base)
    os.VfsLfs2.mkfs(fmt)
    initial = bytes(base)

    # ---- the logged run ---------------------------------------------------------------------
    log = []
    ops = []
    info = {}
    dev = Flash(bytearray(initial), log)
    mount(dev)
    drops = []
    workload(dev, ops, info, drops)
    dropped = {}
    for d in drops:
        for k in d:
            dropped[k] = dropped.get(k, 0) + d[k]
    check(dropped["telemetry"] > 0 and COUNTS.get("moved", 0) > 0, "the workload reaches the bound")
    moved = COUNTS["moved"]
    unmount()
    total = len(log)
    stats = {}
    for st, en, _, _, kind in ops:
        c = stats.setdefault(kind, [0, 0, 0, 0])  # steps, erases, programs, bytes programmed
        c[0] += 1
        for addr, data in log[st:en]:
            if data is ERASED:
                c[1] += 1
            else:
                c[2] += 1
                c[3] += len(data)

    # ---- every cut point, clean and torn ------------------------------------------------------
    img = bytearray(initial)
    for n in range(total + 1):
        if n:
            addr, data = log[n - 1]
            img[addr:addr + len(data)] = data
        verify(img, ops, info, n, "cuts")
        if n < total:
            addr, data = log[n]
            torn = bytearray(img)
            half = len(data) // 2
            torn[addr:addr + half] = data[:half]
            verify(torn, ops, info, n, "torn_cuts")
        gc.collect()

    # ---- a few cuts the direct way: the device raises at write N --------------------------------
    step = total // 9 + 1
    for n in range(3, total, step):
        data = bytearray(initial)
        dev = Flash(data, None, n)
        mount(dev)
        ops2 = []
        info2 = {}
        try:
            workload(dev, ops2, info2)
            raise AssertionError("the workload finished before cut %d" % n)
        except PowerCut:
            pass
        gc.collect()  # files the cut left open are finalised now, into the dead device
        unmount()
        check(ops2 == ops[:len(ops2)], "same run up to the cut")
        verify(data, ops, info, n, "raised_cuts")
        gc.collect()

    print("OK writes=%d cuts=%d torn_cuts=%d raised_cuts=%d puts=%d acks=%d seqmarks=%d" % (
        total, COUNTS["cuts"], COUNTS["torn_cuts"], COUNTS["raised_cuts"], stats["put"][0], stats["ack"][0],
        stats["seq"][0]))
    print("DROPPED %r moved=%d" % (dropped, moved))
    for kind in ("put", "seq", "ack"):
        c = stats[kind]
        print("FLASH %s steps=%d erases=%d programs=%d bytes=%d" % (kind, c[0], c[1], c[2], c[3]))
    flash_per_put(initial)


def flash_per_put(initial):
    """Flash cost of puts with the default layout (4 KiB segments) and ~0.4 KB records."""
    log = []
    dev = Flash(bytearray(initial), log)
    mount(dev)
    b = Buffer("cws/buf", 4096, 32)
    m = SeqMark("cws/state/seq", 1000)
    m.next(T0)
    n0 = len(log)
    puts = 200
    for i in range(puts):
        b.put(m.next(T0), 0, TOPICS[0], payload_for(i, 350))
    erases = 0
    nbytes = 0
    for addr, data in log[n0:]:
        if data is ERASED:
            erases += 1
        else:
            nbytes += len(data)
    unmount()
    print("PERPUT puts=%d erases=%d programs=%d bytes=%d record=%d" % (
        puts, erases, len(log) - n0 - erases, nbytes, 8 + 10 + len(TOPICS[0]) + 350))


main()
