package nbd

import (
	"encoding/binary"
	"fmt"
)

// Wire constants from the NBD protocol specification (NetworkBlockDevice/nbd doc/proto.md).
// go-nbd's pkg/protocol defines only a handful of these, so the full set lives here, named
// as in the spec.
const (
	magicNBD          uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt          uint64 = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply     uint64 = 0x0003e889045565a9
	magicRequest      uint32 = 0x25609513
	magicSimpleReply  uint32 = 0x67446698
	magicStructReply  uint32 = 0x668e33ef
	requestHeaderSize        = 28
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  uint16 = 1 << 0
	flagNoZeroes       uint16 = 1 << 1
	flagCFixedNewstyle uint32 = 1 << 0
	flagCNoZeroes      uint32 = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagRotational      uint16 = 1 << 4
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendResize      uint16 = 1 << 9
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Options.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
)

// Option reply types.
const (
	repAck            uint32 = 1
	repServer         uint32 = 2
	repInfo           uint32 = 3
	repMetaContext    uint32 = 4
	repErrUnsup       uint32 = 1<<31 | 1
	repErrPolicy      uint32 = 1<<31 | 2
	repErrInvalid     uint32 = 1<<31 | 3
	repErrPlatform    uint32 = 1<<31 | 4
	repErrTLSReqd     uint32 = 1<<31 | 5
	repErrUnknown     uint32 = 1<<31 | 6
	repErrShutdown    uint32 = 1<<31 | 7
	repErrBlockSzReqd uint32 = 1<<31 | 8
	repErrTooBig      uint32 = 1<<31 | 9
)

// NBD_INFO types.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Commands.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cflagFUA      uint16 = 1 << 0
	cflagNoHole   uint16 = 1 << 1
	cflagDF       uint16 = 1 << 2
	cflagReqOne   uint16 = 1 << 3
	cflagFastZero uint16 = 1 << 4
	cflagsKnown          = cflagFUA | cflagNoHole | cflagDF | cflagReqOne | cflagFastZero
)

// Structured reply flags and types.
const (
	replyFlagDone        uint16 = 1 << 0
	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeOffsetHole  uint16 = 2
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 | 1
	replyTypeErrorOffset uint16 = 1<<15 | 2
)

// base:allocation state flags.
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

const (
	metaBaseAllocation = "base:allocation"
	// metaContextID is the id this server gives base:allocation, its only context.
	metaContextID uint32 = 1
	// maxString is the spec's hard limit for names, descriptions and error messages.
	maxString = 4096
)

// Errno is an NBD error value as sent on the wire. The spec restricts replies to these.
type Errno uint32

const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

func (e Errno) String() string {
	switch e {
	case 0:
		return "success"
	case EPERM:
		return "EPERM"
	case EIO:
		return "EIO"
	case ENOMEM:
		return "ENOMEM"
	case EINVAL:
		return "EINVAL"
	case ENOSPC:
		return "ENOSPC"
	case EOVERFLOW:
		return "EOVERFLOW"
	case ENOTSUP:
		return "ENOTSUP"
	case ESHUTDOWN:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("errno(%d)", uint32(e))
}

// request is one parsed transmission request header.
type request struct {
	flags  uint16
	cmd    uint16
	handle uint64
	offset uint64
	length uint32
}

func parseRequest(b *[requestHeaderSize]byte) (magic uint32, r request) {
	magic = binary.BigEndian.Uint32(b[0:])
	r.flags = binary.BigEndian.Uint16(b[4:])
	r.cmd = binary.BigEndian.Uint16(b[6:])
	r.handle = binary.BigEndian.Uint64(b[8:])
	r.offset = binary.BigEndian.Uint64(b[16:])
	r.length = binary.BigEndian.Uint32(b[24:])
	return magic, r
}

func cmdName(cmd uint16) string {
	switch cmd {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write_zeroes"
	case cmdBlockStatus:
		return "block_status"
	}
	return fmt.Sprintf("cmd(%d)", cmd)
}

func optName(opt uint32) string {
	switch opt {
	case optExportName:
		return "EXPORT_NAME"
	case optAbort:
		return "ABORT"
	case optList:
		return "LIST"
	case optPeekExport:
		return "PEEK_EXPORT"
	case optStartTLS:
		return "STARTTLS"
	case optInfo:
		return "INFO"
	case optGo:
		return "GO"
	case optStructuredReply:
		return "STRUCTURED_REPLY"
	case optListMetaContext:
		return "LIST_META_CONTEXT"
	case optSetMetaContext:
		return "SET_META_CONTEXT"
	}
	return fmt.Sprintf("opt(%d)", opt)
}

// Encoders append to b so a reply header and a small payload go out in one write.

func appendOptReply(b []byte, opt, typ uint32, payloadLen int) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	return binary.BigEndian.AppendUint32(b, uint32(payloadLen))
}

func appendSimpleReply(b []byte, errno Errno, handle uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, magicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, uint32(errno))
	return binary.BigEndian.AppendUint64(b, handle)
}

func appendChunkHeader(b []byte, flags, typ uint16, handle uint64, payloadLen int) []byte {
	b = binary.BigEndian.AppendUint32(b, magicStructReply)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	return binary.BigEndian.AppendUint32(b, uint32(payloadLen))
}

// appendErrorChunk encodes a final NBD_REPLY_TYPE_ERROR chunk with a human-readable message.
func appendErrorChunk(b []byte, handle uint64, errno Errno, msg string) []byte {
	if len(msg) > maxString {
		msg = msg[:maxString]
	}
	b = appendChunkHeader(b, replyFlagDone, replyTypeError, handle, 6+len(msg))
	b = binary.BigEndian.AppendUint32(b, uint32(errno))
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}
