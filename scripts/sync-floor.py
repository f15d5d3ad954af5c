#!/usr/bin/env python3
"""What an fdatasync costs on this file system, by what is dirty when it is called.

usage: sync-floor.py FILE [ROUNDS]  — FILE: an existing file of at least 1.3 GiB on the file
system to measure (it is overwritten in place: use a scratch copy). Each case writes, then
fdatasyncs, 150 times; it prints the median and mean sync. The cases are what a guest flush
leaves dirty: nbdkit-luks's 32 random 4 KiB writes; sealdisk's journal appends (sequential,
here 160 KiB); sealdisk's journal plus the in-place writes of the previous commit.
"""
import os, random, sys, time

path = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
data_base, data_size = 300 << 20, 1 << 30
if size < data_base + data_size:
    sys.exit(f"{path} is {size} bytes; want at least {data_base + data_size}")
blk, seq = os.urandom(4096), os.urandom(40960)


def case(name, nrand, nseq, iters=150):
    ts = []
    jpos = (1 << 20) + random.randrange(0, 200 << 20, 4096)
    for _ in range(iters):
        for _ in range(nrand):
            os.pwrite(fd, blk, data_base + random.randrange(0, data_size, 4096))
        for _ in range(nseq):
            os.pwrite(fd, seq, jpos)
            jpos += len(seq)
        t = time.perf_counter()
        os.fdatasync(fd)
        ts.append(time.perf_counter() - t)
    ts.sort()
    print(f"{name:34s} p50 {ts[len(ts) // 2] * 1e6:6.0f} us   mean {sum(ts) / len(ts) * 1e6:6.0f} us")


for r in range(rounds):
    print(f"round {r + 1}")
    case("nothing dirty", 0, 0)
    case("32 random 4 KiB", 32, 0)
    case("160 KiB sequential", 0, 4)
    case("160 KiB sequential + 16 random", 16, 4)
    case("160 KiB sequential + 32 random", 32, 4)
