// Package statefile seals a VM's saved state — a QEMU save or migration stream, of a length
// nobody knows in advance — into a file sealed to a chip like an image (docs/FORMAT.md §11):
// a header carrying the certificate that seals a fresh key to the chip, then the stream in
// authenticated, numbered chunks, the last one marked, so that a changed byte, chunks swapped
// or dropped, and a file cut short or extended are all refused.
package statefile

import (
	"bytes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/sector"
)

// Magic opens every state file.
const Magic = "SDSTATE1"

// ChunkSize is the plaintext bytes of every chunk but the last; a certificate sealing a state
// key names it as its virtual size (FORMAT.md §11.1).
const ChunkSize = 64 << 10

// SectorSize is the sector size a state certificate names (the smallest the certificate format
// allows with ChunkSize).
const SectorSize = 4096

const (
	headerFixed = 8 + 2 + 2 + 4 + 16 + 4 // magic, version, suite, chunk size, uuid, cert length
	version     = 1
	maxCert     = 64 << 10
	nonceSize   = 12
	tagSize     = 16
)

var (
	// ErrHeader: the file does not start with a state file header this version reads.
	ErrHeader = errors.New("not a sealdisk state file")
	// ErrAuth: a chunk failed authentication — a changed byte, chunks in another order, or a
	// key that is not the file's.
	ErrAuth = errors.New("state file chunk failed authentication")
	// ErrTruncated: the file ends before its last chunk.
	ErrTruncated = errors.New("state file is truncated")
	// ErrTrailing: bytes follow the last chunk.
	ErrTrailing = errors.New("state file has data after its last chunk")
)

// Header is a state file's header.
type Header struct {
	Suite format.Suite
	UUID  [16]byte
	Cert  []byte // the certificate sealing the key to the chip
	raw   []byte // the header's bytes as written, bound into every chunk's key
}

// Marshal lays out the header.
func (h *Header) marshal() []byte {
	b := make([]byte, headerFixed, headerFixed+len(h.Cert))
	copy(b, Magic)
	binary.BigEndian.PutUint16(b[8:], version)
	binary.BigEndian.PutUint16(b[10:], uint16(h.Suite))
	binary.BigEndian.PutUint32(b[12:], ChunkSize)
	copy(b[16:32], h.UUID[:])
	binary.BigEndian.PutUint32(b[32:], uint32(len(h.Cert)))
	return append(b, h.Cert...)
}

// ReadHeader reads a state file's header from r, leaving r at the first chunk.
func ReadHeader(r io.Reader) (*Header, error) {
	b := make([]byte, headerFixed)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrHeader, err)
	}
	if string(b[:8]) != Magic {
		return nil, fmt.Errorf("%w: magic %q, want %q", ErrHeader, b[:8], Magic)
	}
	if v := binary.BigEndian.Uint16(b[8:]); v != version {
		return nil, fmt.Errorf("%w: version %d, this sealdisk reads %d", ErrHeader, v, version)
	}
	h := &Header{Suite: format.Suite(binary.BigEndian.Uint16(b[10:]))}
	if !h.Suite.Valid() {
		return nil, fmt.Errorf("%w: unknown suite %d", ErrHeader, uint16(h.Suite))
	}
	if cs := binary.BigEndian.Uint32(b[12:]); cs != ChunkSize {
		return nil, fmt.Errorf("%w: chunk size %d, want %d", ErrHeader, cs, ChunkSize)
	}
	copy(h.UUID[:], b[16:32])
	n := binary.BigEndian.Uint32(b[32:])
	if n == 0 || n > maxCert {
		return nil, fmt.Errorf("%w: certificate length %d (1..%d)", ErrHeader, n, maxCert)
	}
	h.Cert = make([]byte, n)
	if _, err := io.ReadFull(r, h.Cert); err != nil {
		return nil, fmt.Errorf("%w: certificate: %v", ErrHeader, err)
	}
	h.raw = append(b, h.Cert...)
	return h, nil
}

// CheckCertificate checks that c is the certificate this header carries and that it seals a
// state key: the state's UUID and suite, ChunkSize and SectorSize as its sizes, read-only.
func (h *Header) CheckCertificate(c *format.Certificate) error {
	switch {
	case !bytes.Equal(c.Bytes(), h.Cert):
		return errors.New("the certificate is not the state file's")
	case c.UUID != h.UUID:
		return fmt.Errorf("certificate is for uuid %x, the state file is %x", c.UUID, h.UUID)
	case c.Suite != h.Suite:
		return fmt.Errorf("certificate suite %s, the state file's is %s", c.Suite, h.Suite)
	case c.VirtualSize != ChunkSize || c.SectorSize != SectorSize || !c.ReadOnly:
		return fmt.Errorf("the certificate seals an image key (virtual size %d, sector size %d, read-only %v), not a state key (%d, %d, read-only)",
			c.VirtualSize, c.SectorSize, c.ReadOnly, ChunkSize, SectorSize)
	}
	return nil
}

// streamAEAD derives the chunks' AEAD from the sealed key and the header's bytes, so that a
// changed header byte fails the first chunk.
func streamAEAD(suite format.Suite, key, header []byte) (cipher.AEAD, error) {
	d := sha256.Sum256(header)
	k, err := hkdf.Key(sha256.New, key, d[:], "sealdisk v1 state stream", sector.SuiteKeySize(suite))
	if err != nil {
		return nil, err
	}
	defer clear(k)
	return sector.NewAEAD(suite, k)
}

// nonce is the chunk's index, big-endian in 11 bytes, then 1 for the last chunk, else 0.
func nonce(n *[nonceSize]byte, i uint64, last bool) {
	clear(n[:])
	binary.BigEndian.PutUint64(n[3:11], i)
	if last {
		n[11] = 1
	}
}

// Seal writes a state file to w: the header for cert (which seals key to the chip and names
// uuid and suite), then src in chunks until src ends. It returns the plaintext bytes sealed.
// An error from src leaves w without a last chunk, which Open refuses.
func Seal(w io.Writer, src io.Reader, suite format.Suite, uuid [16]byte, cert, key []byte) (int64, error) {
	h := &Header{Suite: suite, UUID: uuid, Cert: cert}
	raw := h.marshal()
	aead, err := streamAEAD(suite, key, raw)
	if err != nil {
		return 0, err
	}
	defer sector.WipeAEAD(aead)
	if _, err := w.Write(raw); err != nil {
		return 0, err
	}
	// Two chunk buffers: a chunk is sealed only once the next read shows whether it is last.
	cur, next := make([]byte, ChunkSize, ChunkSize+tagSize), make([]byte, ChunkSize, ChunkSize+tagSize)
	defer clear(cur[:cap(cur)])
	defer clear(next[:cap(next)])
	n, err := io.ReadFull(src, cur)
	var total int64
	var nc [nonceSize]byte
	for i := uint64(0); ; i++ {
		if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
			return total, fmt.Errorf("failed to read the state: %w", err)
		}
		last := err != nil
		var m int
		var nerr error
		if !last {
			m, nerr = io.ReadFull(src, next)
			if nerr == io.EOF { // cur was the last chunk, and a full one
				last = true
			}
		}
		nonce(&nc, i, last)
		ct := aead.Seal(cur[:0], nc[:], cur[:n], nil)
		if _, err := w.Write(ct); err != nil {
			return total, err
		}
		total += int64(n)
		if last {
			return total, nil
		}
		cur, next, n, err = next, cur, m, nerr
	}
}

// Open writes the plaintext of the state file whose header h was read from r (ReadHeader) to
// dst, under the key the certificate sealed. Each chunk is authenticated before its plaintext
// is written; the file must end with its last chunk. It returns the bytes written.
func Open(dst io.Writer, r io.Reader, h *Header, key []byte) (int64, error) {
	aead, err := streamAEAD(h.Suite, key, h.raw)
	if err != nil {
		return 0, err
	}
	defer sector.WipeAEAD(aead)
	buf := make([]byte, ChunkSize+tagSize)
	plain := make([]byte, ChunkSize) // not opened in place: a failed Open clears its output
	defer clear(plain)
	var total int64
	var nc [nonceSize]byte
	var peek [1]byte
	havePeek := false
	for i := uint64(0); ; i++ {
		off := 0
		if havePeek {
			buf[0], off = peek[0], 1
		}
		n, err := io.ReadFull(r, buf[off:])
		n += off
		last := false
		switch {
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			last = true
		case err != nil:
			return total, fmt.Errorf("failed to read the state file: %w", err)
		default:
			// A full chunk is the last when nothing follows it.
			k, perr := r.Read(peek[:])
			for k == 0 && perr == nil {
				k, perr = r.Read(peek[:])
			}
			switch {
			case k == 1:
				havePeek = true
			case perr == io.EOF:
				last, havePeek = true, false
			default:
				return total, fmt.Errorf("failed to read the state file: %w", perr)
			}
		}
		if n < tagSize {
			return total, fmt.Errorf("%w: chunk %d has %d bytes, less than a tag", ErrTruncated, i, n)
		}
		nonce(&nc, i, last)
		pt, oerr := aead.Open(plain[:0], nc[:], buf[:n], nil)
		if oerr != nil {
			// Sealed with the other flag? Then the chunk is whole and the file's end is wrong:
			// cut after a chunk that is not the last, or extended past the last.
			nonce(&nc, i, !last)
			if _, merr := aead.Open(plain[:0], nc[:], buf[:n], nil); merr == nil {
				if last {
					return total, fmt.Errorf("%w: it ends after chunk %d (%d bytes of state), which is not the last", ErrTruncated, i, total+int64(n-tagSize))
				}
				return total, fmt.Errorf("%w (chunk %d)", ErrTrailing, i)
			}
			return total, fmt.Errorf("%w: chunk %d (at byte %d of the state)", ErrAuth, i, total)
		}
		if _, err := dst.Write(pt); err != nil {
			return total, fmt.Errorf("failed to write the state: %w", err)
		}
		total += int64(len(pt))
		if last {
			return total, nil
		}
	}
}
