package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

const (
	// maxOptionPayload is the largest option payload read into memory: enough for a
	// 4096-byte export name plus several 4096-byte meta-context queries.
	maxOptionPayload = 64 << 10
	// maxOptionDiscard: larger payloads up to this are skipped and refused with
	// NBD_REP_ERR_TOO_BIG; beyond it the client is treated as hostile and disconnected.
	maxOptionDiscard = 16 << 20
)

// errAbort ends a handshake the client asked to end (NBD_OPT_ABORT): not worth a log line.
var errAbort = errors.New("client aborted the handshake")

// handshake runs the fixed-newstyle negotiation. It returns the export once the client
// entered transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME); any error closes the connection.
func (c *conn) handshake() (*export, error) {
	c.raw.SetDeadline(time.Now().Add(c.s.opts.HandshakeTimeout))

	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicNBD)
	binary.BigEndian.PutUint64(hello[8:], magicOpt)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if err := c.hsWrite(hello[:]); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, fmt.Errorf("failed to read client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return nil, fmt.Errorf("client sent unknown flags %#x", flags)
	}
	c.fixed = flags&flagCFixedNewstyle != 0
	c.noZeroes = flags&flagCNoZeroes != 0
	if c.s.opts.RequireTLS && !c.fixed {
		// TLS needs fixed newstyle, and this server allows nothing without TLS.
		return nil, errors.New("client without fixed newstyle cannot start the required TLS")
	}

	for {
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return nil, fmt.Errorf("failed to read option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != magicOpt {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > maxOptionPayload {
			if opt == optExportName || n > maxOptionDiscard {
				return nil, fmt.Errorf("option %s payload of %d bytes refused", optName(opt), n)
			}
			if err := discard(c.br, int64(n)); err != nil {
				return nil, fmt.Errorf("failed to skip option payload: %w", err)
			}
			if err := c.optReply(opt, repErrTooBig, []byte("option payload too large")); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("failed to read option payload: %w", err)
		}
		x, err := c.option(opt, data)
		if err != nil || x != nil {
			return x, err
		}
	}
}

// hsWrite writes handshake bytes and flushes; no other writer exists before transmission.
func (c *conn) hsWrite(b []byte) error {
	if _, err := c.bw.Write(b); err != nil {
		return fmt.Errorf("failed to write handshake: %w", err)
	}
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("failed to write handshake: %w", err)
	}
	return nil
}

func (c *conn) optReply(opt, typ uint32, payload []byte) error {
	b := appendOptReply(make([]byte, 0, 20+len(payload)), opt, typ, len(payload))
	return c.hsWrite(append(b, payload...))
}

func (c *conn) optErr(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, []byte(msg))
}

// option handles one option. It returns the export when transmission starts.
func (c *conn) option(opt uint32, data []byte) (*export, error) {
	s := c.s
	s.mu.Lock()
	down := s.shuttingDown
	s.mu.Unlock()
	if down && opt != optAbort {
		if opt == optExportName {
			return nil, errors.New("server shutting down")
		}
		return nil, c.optErr(opt, repErrShutdown, "server is shutting down")
	}
	if s.opts.RequireTLS && !c.tlsUp && opt != optStartTLS && opt != optAbort {
		if opt == optExportName {
			return nil, errors.New("NBD_OPT_EXPORT_NAME before the required TLS")
		}
		return nil, c.optErr(opt, repErrTLSReqd, "TLS is required")
	}

	switch opt {
	case optAbort:
		// The client may already be gone; the reply is a courtesy.
		c.optReply(opt, repAck, nil)
		return nil, errAbort

	case optList:
		if len(data) != 0 {
			return nil, c.optErr(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		s.mu.Lock()
		var listed []*export
		for _, x := range s.exports {
			if c.visible(x) {
				listed = append(listed, x)
			}
		}
		s.mu.Unlock()
		slices.SortFunc(listed, func(a, b *export) int { return strings.Compare(a.Name, b.Name) })
		for _, x := range listed {
			p := binary.BigEndian.AppendUint32(nil, uint32(len(x.Name)))
			p = append(append(p, x.Name...), x.Description...)
			if err := c.optReply(opt, repServer, p); err != nil {
				return nil, err
			}
		}
		return nil, c.optReply(opt, repAck, nil)

	case optStartTLS:
		return nil, c.startTLS(data)

	case optStructuredReply:
		if len(data) != 0 {
			return nil, c.optErr(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		if c.structured {
			return nil, c.optErr(opt, repErrInvalid, "structured replies already negotiated")
		}
		c.structured = true
		return nil, c.optReply(opt, repAck, nil)

	case optInfo, optGo:
		return c.infoGo(opt, data)

	case optListMetaContext, optSetMetaContext:
		return nil, c.metaContext(opt, data)

	case optExportName:
		return c.exportName(data)
	}
	return nil, c.optErr(opt, repErrUnsup, fmt.Sprintf("option %d not supported", opt))
}

// visible says whether this client may see x at all.
func (c *conn) visible(x *export) bool {
	return x.AllowedIdentity == "" || (c.tlsUp && c.identity == x.AllowedIdentity)
}

// refusal is the option error for an export this client cannot have: without TLS on a
// server that offers it, NBD_REP_ERR_TLS_REQD whether or not the export exists (the
// export may need TLS, and clients cannot enumerate names); otherwise NBD_REP_ERR_UNKNOWN,
// so an export reserved to another identity is indistinguishable from a missing one.
func (c *conn) refusal() uint32 {
	if !c.tlsUp && c.s.opts.TLS != nil {
		return repErrTLSReqd
	}
	return repErrUnknown
}

func (c *conn) startTLS(data []byte) error {
	const opt = optStartTLS
	switch {
	case len(data) != 0:
		return c.optErr(opt, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case c.s.opts.TLS == nil:
		return c.optErr(opt, repErrPolicy, "TLS is not configured on this server")
	case c.tlsUp:
		return c.optErr(opt, repErrInvalid, "TLS already started")
	case !c.fixed:
		return c.optErr(opt, repErrInvalid, "TLS needs fixed newstyle negotiation")
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return err
	}
	if c.br.Buffered() > 0 {
		// Bytes sent before the TLS handshake would be processed as if protected by it.
		return errors.New("client sent plaintext after NBD_OPT_STARTTLS")
	}
	tc := tls.Server(c.raw, c.s.opts.TLS)
	if err := tc.HandshakeContext(c.ctx); err != nil {
		return fmt.Errorf("failed TLS handshake: %w", err)
	}
	c.mu.Lock()
	c.nc = tc
	c.mu.Unlock()
	c.br.Reset(tc)
	c.bw.Reset(tc)
	c.tlsUp = true
	if st := tc.ConnectionState(); len(st.VerifiedChains) > 0 && len(st.VerifiedChains[0]) > 0 {
		c.identity = c.s.identity(st.VerifiedChains[0][0])
	}
	// The spec: nothing negotiated before STARTTLS survives it.
	c.structured, c.metaOK, c.metaExport = false, false, ""
	c.log.Debug("nbd TLS started", "identity", c.identity)
	return nil
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
func (c *conn) infoGo(opt uint32, data []byte) (*export, error) {
	name, reqs, ok := parseInfoRequest(data)
	if !ok {
		return nil, c.optErr(opt, repErrInvalid, "malformed NBD_OPT_INFO/GO request")
	}
	if validString("export name", name) != nil {
		return nil, c.optErr(opt, repErrInvalid, "invalid export name")
	}
	var x *export
	if opt == optGo {
		var typ uint32
		if x, typ = c.enter(name); x == nil {
			return nil, c.optErr(opt, typ, "export not available")
		}
	} else {
		c.s.mu.Lock()
		x = c.s.lookupLocked(name)
		c.s.mu.Unlock()
		if x == nil || !c.visible(x) {
			return nil, c.optErr(opt, c.refusal(), "export not available")
		}
	}
	size, tflags := c.exportInfo(x)

	p := binary.BigEndian.AppendUint16(nil, infoExport)
	p = binary.BigEndian.AppendUint64(p, size)
	p = binary.BigEndian.AppendUint16(p, tflags)
	if err := c.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	// Block sizes are sent whether asked or not (the spec allows unrequested info): clients
	// that understand them can do better, others ignore them.
	p = binary.BigEndian.AppendUint16(nil, infoBlockSize)
	p = binary.BigEndian.AppendUint32(p, x.minBlock)
	p = binary.BigEndian.AppendUint32(p, x.prefBlock)
	p = binary.BigEndian.AppendUint32(p, x.maxBlock)
	if err := c.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	for _, r := range reqs {
		switch {
		case r == infoName:
			p = binary.BigEndian.AppendUint16(nil, infoName)
			if err := c.optReply(opt, repInfo, append(p, x.Name...)); err != nil {
				return nil, err
			}
		case r == infoDescription && x.Description != "":
			p = binary.BigEndian.AppendUint16(nil, infoDescription)
			if err := c.optReply(opt, repInfo, append(p, x.Description...)); err != nil {
				return nil, err
			}
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		c.size, c.tflags = size, tflags
		return x, nil
	}
	return nil, nil
}

// exportName handles the legacy NBD_OPT_EXPORT_NAME, which cannot fail politely.
func (c *conn) exportName(data []byte) (*export, error) {
	name := string(data)
	if validString("export name", name) != nil {
		return nil, errors.New("invalid export name in NBD_OPT_EXPORT_NAME")
	}
	x, _ := c.enter(name)
	if x == nil {
		return nil, fmt.Errorf("export %q not available to NBD_OPT_EXPORT_NAME", name)
	}
	size, tflags := c.exportInfo(x)
	p := binary.BigEndian.AppendUint64(make([]byte, 0, 134), size)
	p = binary.BigEndian.AppendUint16(p, tflags)
	if !c.noZeroes {
		p = append(p, make([]byte, 124)...)
	}
	if err := c.hsWrite(p); err != nil {
		return nil, err
	}
	c.size, c.tflags = size, tflags
	return x, nil
}

// enter registers the connection as a user of the export it is about to open, atomically
// with the lookup, so RemoveExport and Shutdown see it. On refusal it returns the option
// error to send.
func (c *conn) enter(name string) (*export, uint32) {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shuttingDown {
		return nil, repErrShutdown
	}
	x := s.lookupLocked(name)
	if x == nil || !c.visible(x) {
		return nil, c.refusal()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		return nil, repErrShutdown
	}
	c.exp = x
	c.transmitting = true
	c.nc.SetDeadline(time.Time{}) // the handshake timeout no longer applies
	c.meta = c.structured && c.metaOK && c.metaExport == x.Name && x.caps.BlockStatus
	return x, 0
}

// exportInfo is the size and transmission flags: exactly what the device's Caps allow.
func (c *conn) exportInfo(x *export) (uint64, uint16) {
	size := x.Device.Size()
	if size < 0 {
		size = 0
	}
	caps := x.caps
	f := tflagHasFlags | tflagSendFlush | tflagSendCache
	if caps.ReadOnly {
		f |= tflagReadOnly
	} else {
		if caps.FUA {
			f |= tflagSendFUA
		}
		if caps.Trim {
			f |= tflagSendTrim
		}
		if caps.WriteZeroes {
			f |= tflagSendWriteZeroes
			if caps.FastZero {
				f |= tflagSendFastZero
			}
		}
	}
	if caps.MultiConn {
		f |= tflagCanMultiConn
	}
	if c.structured {
		f |= tflagSendDF // every read is answered with a single data chunk anyway
	}
	return uint64(size), f
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. The only
// context is base:allocation, offered when the device reports block status.
func (c *conn) metaContext(opt uint32, data []byte) error {
	set := opt == optSetMetaContext
	if set {
		c.metaOK, c.metaExport = false, "" // replaced even when this request fails
		if !c.structured {
			return c.optErr(opt, repErrInvalid, "structured replies must be negotiated first")
		}
	}
	name, queries, ok := parseMetaRequest(data)
	if !ok {
		return c.optErr(opt, repErrInvalid, "malformed meta context request")
	}
	if validString("export name", name) != nil {
		return c.optErr(opt, repErrInvalid, "invalid export name")
	}
	match := len(queries) == 0 && !set // no query lists everything, selects nothing
	for _, q := range queries {
		ns, leaf, found := strings.Cut(q, ":")
		if !found || ns == "" {
			return c.optErr(opt, repErrInvalid, "meta context query without a namespace")
		}
		if ns == "base" && (leaf == "allocation" || (leaf == "" && !set)) {
			match = true
		}
	}
	c.s.mu.Lock()
	x := c.s.lookupLocked(name)
	c.s.mu.Unlock()
	if x == nil || !c.visible(x) {
		return c.optErr(opt, c.refusal(), "export not available")
	}
	if match && x.caps.BlockStatus {
		id := uint32(0) // LIST replies carry a reserved zero id
		if set {
			id = metaContextID
			c.metaOK, c.metaExport = true, x.Name
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := c.optReply(opt, repMetaContext, append(p, metaBaseAllocation...)); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}

// parseInfoRequest splits an NBD_OPT_INFO/GO payload: name, then the info requests.
func parseInfoRequest(d []byte) (name string, reqs []uint16, ok bool) {
	if len(d) < 6 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(d)
	if uint64(n) > uint64(len(d)-6) {
		return "", nil, false
	}
	name, d = string(d[4:4+n]), d[4+n:]
	k := int(binary.BigEndian.Uint16(d))
	d = d[2:]
	if len(d) != 2*k {
		return "", nil, false
	}
	reqs = make([]uint16, k)
	for i := range reqs {
		reqs[i] = binary.BigEndian.Uint16(d[2*i:])
	}
	return name, reqs, true
}

// parseMetaRequest splits a meta-context payload: name, query count, queries. Every length
// is checked against what is left, so the count cannot make it allocate.
func parseMetaRequest(d []byte) (name string, queries []string, ok bool) {
	str := func() (string, bool) {
		if len(d) < 4 {
			return "", false
		}
		n := binary.BigEndian.Uint32(d)
		if uint64(n) > uint64(len(d)-4) {
			return "", false
		}
		s := string(d[4 : 4+n])
		d = d[4+n:]
		return s, true
	}
	if name, ok = str(); !ok || len(d) < 4 {
		return "", nil, false
	}
	k := binary.BigEndian.Uint32(d)
	d = d[4:]
	for i := uint32(0); i < k; i++ {
		q, ok := str()
		if !ok {
			return "", nil, false
		}
		queries = append(queries, q)
	}
	if len(d) != 0 {
		return "", nil, false
	}
	return name, queries, true
}
