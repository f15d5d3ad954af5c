// Package nbd is sealdisk's NBD server frontend: it serves any engine.BlockDevice to NBD
// clients (QEMU, qemu-img, nbd-client, nbdcopy, fio) over Unix sockets or TLS-protected
// TCP, following the protocol specification (NetworkBlockDevice/nbd doc/proto.md).
//
// The frontend is thin: it negotiates (fixed newstyle, NBD_OPT_GO/INFO/LIST/ABORT/
// STARTTLS, structured replies, base:allocation), validates every request once at the
// protocol edge, and calls the device. Alignment, read-modify-write, ordering and flushing
// are the device's job. Device errors become wire errors in one function, errnoFor.
//
// Each connection reads requests on one goroutine and runs them concurrently, bounded in
// count and buffer bytes (Options.MaxInFlight, MaxInFlightBytes); at the bound the server
// stops reading, so backpressure reaches the client through the socket. Replies are written
// whole, in completion order. A read reply is only sent once the device has returned every
// byte, so a sector failing authentication is an EIO reply, never data.
//
// docs/NBD.md lists what is supported, the errno mapping and the limits.
package nbd
