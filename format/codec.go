package format

import (
	"encoding/binary"
	"fmt"
)

// reader is a bounds-checked big-endian cursor. The first failure sticks: later reads return
// zero values, and err names the field that ran out.
type reader struct {
	b     []byte
	off   int
	where string
	err   error
}

func (r *reader) fail(field, reason string) {
	if r.err == nil {
		r.err = &FieldError{Where: r.where, Field: field, Reason: reason}
	}
}

func (r *reader) take(field string, n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || len(r.b)-r.off < n {
		r.fail(field, fmt.Sprintf("truncated: need %d bytes at offset %d, have %d", n, r.off, len(r.b)-r.off))
		return nil
	}
	s := r.b[r.off : r.off+n]
	r.off += n
	return s
}

func (r *reader) u8(field string) uint8 {
	if s := r.take(field, 1); s != nil {
		return s[0]
	}
	return 0
}

func (r *reader) u16(field string) uint16 {
	if s := r.take(field, 2); s != nil {
		return binary.BigEndian.Uint16(s)
	}
	return 0
}

func (r *reader) u32(field string) uint32 {
	if s := r.take(field, 4); s != nil {
		return binary.BigEndian.Uint32(s)
	}
	return 0
}

func (r *reader) u64(field string) uint64 {
	if s := r.take(field, 8); s != nil {
		return binary.BigEndian.Uint64(s)
	}
	return 0
}

// writer appends big-endian fields.
type writer struct{ b []byte }

func (w *writer) u16(v uint16) { w.b = binary.BigEndian.AppendUint16(w.b, v) }
func (w *writer) u32(v uint32) { w.b = binary.BigEndian.AppendUint32(w.b, v) }
func (w *writer) u64(v uint64) { w.b = binary.BigEndian.AppendUint64(w.b, v) }
func (w *writer) raw(v []byte) { w.b = append(w.b, v...) }
func (w *writer) str(s string) { w.b = append(w.b, s...) }

// check records reason against field unless an earlier field already failed; "" means the
// value passed. Parsers and Validate methods share it so the same rule yields the same error.
func (r *reader) check(field, reason string) {
	if reason != "" {
		r.fail(field, reason)
	}
}

// checkErr is check for a rule whose cause callers may test with errors.Is/As.
func (r *reader) checkErr(field, reason string, cause error) {
	if reason != "" && r.err == nil {
		r.err = &FieldError{Where: r.where, Field: field, Reason: reason, Err: cause}
	}
}

// array16 and array32 read fixed-size fields; they stay zero after a failure.
func (r *reader) array16(field string) (a [16]byte) {
	copy(a[:], r.take(field, 16))
	return a
}

func (r *reader) array32(field string) (a [32]byte) {
	copy(a[:], r.take(field, 32))
	return a
}
