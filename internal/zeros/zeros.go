// Package zeros answers whether bytes are all zero: never-written sectors, empty entries and
// holes are all recognised by it, in every package that reads image bytes.
package zeros

import "encoding/binary"

// All reports whether every byte of b is zero (true for an empty b). It reads eight bytes at a
// time: it runs over whole metadata pages and sectors on the data path.
func All(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
