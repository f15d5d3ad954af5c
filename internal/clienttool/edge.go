package clienttool

// EdgeScript is nbdsh's walk over the NBD protocol's edges (libnbd raises on every failed
// check; it prints "edge cases ok" at the end): block sizes and capabilities, requests past
// the end and above the maximum block, a 32 MiB request each way, 64 pipelined requests, FUA,
// write zeroes, fast zero, trim and block status, cache, and a flush across two connections,
// against NBD_URI (a writable export of 64 MiB or more, whose contents it overwrites). With
// NBD_SOCK set it also checks the nbd package's test exports on that socket: "tampered"
// (EIO, never data), "slowzero" (FAST_ZERO refused) and "ro" (read-only). The nbd package's
// tests and the end-to-end tests of sealdisk serve run this one script.
const EdgeScript = `
import errno, os
uri = os.environ["NBD_URI"]
extra = "NBD_SOCK" in os.environ

def conn(name=None):
    g = nbd.NBD()
    g.add_meta_context("base:allocation")
    if name is None:
        g.connect_uri(uri)
    else:
        g.set_export_name(name)
        g.connect_unix(os.environ["NBD_SOCK"])
    return g

def expect_err(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd's Python binding gives the errno's name.
        assert e.errno == errno.errorcode[want], "%s: errno %s, want %s (%s)" % (what, e.errno, errno.errorcode[want], e)
    else:
        raise AssertionError(what + ": no error")

h = conn()
size = h.get_size()
M = 32 * 1024 * 1024
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == M
for cap in ("can_multi_conn", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_flush", "can_df"):
    assert getattr(h, cap)(), cap
assert h.can_meta_context("base:allocation")
assert h.get_structured_replies_negotiated()

# Let invalid requests reach the server: its answers are what is tested.
h.set_strict_mode(0)
expect_err(lambda: h.pread(2, size - 1), errno.EINVAL, "read past end")
expect_err(lambda: h.pwrite(b"ab", size - 1), errno.ENOSPC, "write past end")
expect_err(lambda: h.trim(2, size - 1), errno.EINVAL, "trim past end")
expect_err(lambda: h.zero(2, size - 1), errno.ENOSPC, "zero past end")
expect_err(lambda: h.pread(M + 1, 0), errno.EINVAL, "read above maximum block")
expect_err(lambda: h.pwrite(bytes(M + 1), 0), errno.EINVAL, "write above maximum block")
assert h.pread(0, 0) == b"", "zero-length read"
h.pwrite(b"", 0)
# The connection is still fine, and a request of exactly the maximum works.
big = os.urandom(M)
h.pwrite(big, 0)
assert h.pread(M, 0) == big, "32 MiB round trip"
h.set_strict_mode(nbd.STRICT_MASK)

# 64 pipelined requests in flight at once (the device completes them out of order).
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(bufs[i], i * 65536) for i in range(64)]
assert h.aio_in_flight() > 1, "requests were not pipelined"
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    assert h.aio_command_completed(c)
    assert bufs[i].to_bytearray() == big[i * 65536:i * 65536 + 4096], "pipelined read %d" % i
wcookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096), M + i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in wcookies:
    assert h.aio_command_completed(c)
assert h.pread(64 * 4096, M) == b"".join(bytes([i]) * 4096 for i in range(64))

# FUA, write zeroes, fast zero, trim + block status, cache.
h.pwrite(b"\xaa" * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == b"\xaa" * 65536
h.zero(65536, 0)
assert h.pread(65536, 0) == bytes(65536), "write zeroes"
h.pwrite(b"\xbb" * 65536, 0)
# The nbd package's test device zeroes fast even with NO_HOLE; sealdisk's engine cannot (it
# would write sealed zeros), so it answers FAST_ZERO|NO_HOLE with ENOTSUP and is asked for a
# fast zero that may punch.
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | (nbd.CMD_FLAG_NO_HOLE if extra else 0))
if not extra:
    expect_err(lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE), errno.ENOTSUP, "fast zero without holes")
assert h.pread(65536, 0) == bytes(65536), "fast zero"
h.pwrite(b"\xcc" * 131072, 131072)
h.trim(65536, 131072, nbd.CMD_FLAG_FUA)
ext = []
def cb(metacontext, offset, entries, err):
    assert metacontext == "base:allocation"
    ext.extend(entries)
h.block_status(3 * 65536, 131072, cb)
assert ext[:2] == [65536, nbd.STATE_HOLE | nbd.STATE_ZERO], "trimmed range not a hole: %r" % ext
assert ext[2:4] == [131072, 0], "data after the hole: %r" % ext
ext = []
h.block_status(3 * 65536, 131072, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(ext) == 2, "REQ_ONE gave %r" % ext
h.cache(M, 0)
h.flush()

# Flush across two connections (multi-conn): a write acknowledged on one connection is
# covered by a flush on the other, and visible there.
h2 = conn()
h.pwrite(b"multi-conn", 4 * 65536)
h2.flush()
assert h2.pread(10, 4 * 65536) == b"multi-conn"

if extra:
    # A tampered region: EIO, never data; the connection survives.
    t = conn("tampered")
    t.pwrite(b"fine", 0)
    expect_err(lambda: t.pread(4096, 8192), errno.EIO, "read of a tampered sector")
    expect_err(lambda: t.cache(4096, 8192), errno.EIO, "cache of a tampered sector")
    assert t.pread(4, 0) == b"fine"

    # A device that cannot zero fast: FAST_ZERO fails with ENOTSUP, plain zero works.
    s = conn("slowzero")
    assert s.can_fast_zero()
    expect_err(lambda: s.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP, "fast zero on a slow device")
    s.zero(4096, 0)

    # Read-only export.
    r = conn("ro")
    assert r.is_read_only() and not r.can_trim() and not r.can_zero()
    r.set_strict_mode(0)
    expect_err(lambda: r.pwrite(b"x", 0), errno.EPERM, "write to a read-only export")
    expect_err(lambda: r.trim(1, 0), errno.EPERM, "trim of a read-only export")
    for g in (t, s, r):
        g.shutdown()
for g in (h, h2):
    g.shutdown()
print("edge cases ok")
`
