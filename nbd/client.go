package nbd

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// The client side of the handshake, for `sealdisk attach`: the kernel's nbd driver only
// does transmission, so negotiation happens here, to the spec: fixed newstyle, STARTTLS
// when asked, NBD_OPT_GO with a block-size request. (go-nbd v0.3.2's client.Connect is not
// used for this: it sends NBD_OPT_GO with an option length of 0 followed by the payload,
// which a spec-following server reads as a malformed option, never sets fixed newstyle, so
// it cannot start TLS, and passes no transmission flags to the kernel, so the kernel would
// never send FLUSH.)

var (
	noDeadline   time.Time
	pastDeadline = time.Unix(1, 0)
)

// ExportInfo is what NBD_OPT_GO reported about an export.
type ExportInfo struct {
	Size  uint64
	Flags uint16 // transmission flags, as the kernel's NBD_SET_FLAGS takes them
	// Block sizes (NBD_INFO_BLOCK_SIZE); zero when the server sent none.
	MinBlock, PreferredBlock, MaxBlock uint32
}

// ReadOnly reports NBD_FLAG_READ_ONLY.
func (i ExportInfo) ReadOnly() bool { return i.Flags&tflagReadOnly != 0 }

// Errors an OptionError matches with errors.Is.
var (
	ErrExportUnknown = errors.New("export unknown")
	ErrTLSRequired   = errors.New("server requires TLS")
	ErrPolicy        = errors.New("refused by server policy")
)

// OptionError is the server's error reply (NBD_REP_ERR_*) to an option.
type OptionError struct {
	Option  uint32
	Reply   uint32
	Message string // the server's text, if any
}

func (e *OptionError) Error() string {
	what := fmt.Sprintf("error %#x", e.Reply)
	switch e.Reply {
	case repErrUnknown:
		what = ErrExportUnknown.Error()
	case repErrTLSReqd:
		what = ErrTLSRequired.Error()
	case repErrPolicy:
		what = ErrPolicy.Error()
	case repErrUnsup:
		what = "option not supported"
	case repErrInvalid:
		what = "invalid option"
	case repErrShutdown:
		what = "server shutting down"
	}
	if e.Message != "" {
		what += ": " + e.Message
	}
	return fmt.Sprintf("nbd: NBD_OPT_%s: %s", optName(e.Option), what)
}

func (e *OptionError) Is(target error) bool {
	switch target {
	case ErrExportUnknown:
		return e.Reply == repErrUnknown
	case ErrTLSRequired:
		return e.Reply == repErrTLSReqd
	case ErrPolicy:
		return e.Reply == repErrPolicy
	}
	return false
}

// ClientNegotiate runs the handshake on conn for export and leaves the connection in
// transmission. With tlsConf it starts TLS first (NBD_OPT_STARTTLS) and the returned
// connection is the TLS one; otherwise it is conn. Nothing is read past the final reply, so
// conn's socket can be handed to the kernel afterwards. ctx bounds the handshake.
func ClientNegotiate(ctx context.Context, conn net.Conn, export string, tlsConf *tls.Config) (net.Conn, ExportInfo, error) {
	var info ExportInfo
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
		defer conn.SetDeadline(noDeadline)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(pastDeadline) })
	defer stop()

	var hello [18]byte
	if _, err := io.ReadFull(conn, hello[:]); err != nil {
		return nil, info, fmt.Errorf("failed to read the NBD greeting: %w", err)
	}
	if binary.BigEndian.Uint64(hello[0:]) != magicNBD || binary.BigEndian.Uint64(hello[8:]) != magicOpt {
		return nil, info, errors.New("not an NBD newstyle server (bad greeting)")
	}
	sflags := binary.BigEndian.Uint16(hello[16:])
	if sflags&flagFixedNewstyle == 0 {
		return nil, info, errors.New("server does not offer fixed newstyle negotiation")
	}
	cflags := flagCFixedNewstyle
	if sflags&flagNoZeroes != 0 {
		cflags |= flagCNoZeroes
	}
	if _, err := conn.Write(binary.BigEndian.AppendUint32(nil, cflags)); err != nil {
		return nil, info, fmt.Errorf("failed to send client flags: %w", err)
	}

	if tlsConf != nil {
		if err := clientOpt(conn, optStartTLS, nil, nil); err != nil {
			return nil, info, err
		}
		tc := tls.Client(conn, tlsConf)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, info, fmt.Errorf("failed TLS handshake: %w", err)
		}
		conn = tc
	}

	p := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	p = append(p, export...)
	p = binary.BigEndian.AppendUint16(p, 1)
	p = binary.BigEndian.AppendUint16(p, infoBlockSize)
	err := clientOpt(conn, optGo, p, func(data []byte) {
		if len(data) < 2 {
			return
		}
		switch binary.BigEndian.Uint16(data) {
		case infoExport:
			if len(data) >= 12 {
				info.Size = binary.BigEndian.Uint64(data[2:])
				info.Flags = binary.BigEndian.Uint16(data[10:])
			}
		case infoBlockSize:
			if len(data) >= 14 {
				info.MinBlock = binary.BigEndian.Uint32(data[2:])
				info.PreferredBlock = binary.BigEndian.Uint32(data[6:])
				info.MaxBlock = binary.BigEndian.Uint32(data[10:])
			}
		}
	})
	if err != nil {
		return nil, info, err
	}
	return conn, info, nil
}

// clientOpt sends one option and reads its replies up to the final one: ACK returns nil,
// NBD_REP_INFO payloads go to onInfo, an error reply is an *OptionError.
func clientOpt(conn net.Conn, opt uint32, payload []byte, onInfo func([]byte)) error {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	if _, err := conn.Write(append(b, payload...)); err != nil {
		return fmt.Errorf("failed to send NBD_OPT_%s: %w", optName(opt), err)
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(conn, h[:]); err != nil {
			return fmt.Errorf("failed to read the reply to NBD_OPT_%s: %w", optName(opt), err)
		}
		if binary.BigEndian.Uint64(h[0:]) != magicOptReply || binary.BigEndian.Uint32(h[8:]) != opt {
			return fmt.Errorf("bad reply to NBD_OPT_%s", optName(opt))
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > maxOptionPayload {
			return fmt.Errorf("reply to NBD_OPT_%s of %d bytes refused", optName(opt), n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(conn, data); err != nil {
			return fmt.Errorf("failed to read the reply to NBD_OPT_%s: %w", optName(opt), err)
		}
		switch {
		case typ == repAck:
			return nil
		case typ == repInfo && onInfo != nil:
			onInfo(data)
		case typ&(1<<31) != 0:
			msg := string(data)
			if len(msg) > 200 || validString("message", msg) != nil {
				msg = ""
			}
			return &OptionError{Option: opt, Reply: typ, Message: msg}
		default:
			return fmt.Errorf("unexpected reply %#x to NBD_OPT_%s", typ, optName(opt))
		}
	}
}
