package format

import "fmt"

// Field rules shared by the header and the certificate (FORMAT.md §1–§3). Each returns "" when
// the value is allowed, else the reason. They are total (any input, no panic) because parsers
// call them on whatever the bytes say.

func ruleUUID(u [16]byte) string {
	switch {
	case u == [16]byte{}:
		return "is all zero"
	case u[6]>>4 != 4 || u[8]&0xc0 != 0x80:
		return fmt.Sprintf("%x is not an RFC 9562 version-4 UUID", u)
	}
	return ""
}

func ruleSectorSize(s uint32) string {
	if s != 512 && s != 4096 {
		return fmt.Sprintf("must be 512 or 4096, got %d", s)
	}
	return ""
}

// ruleVirtualSize assumes the sector size already passed ruleSectorSize; it only guards
// against zero so that it stays total.
func ruleVirtualSize(v uint64, sectorSize uint32) string {
	switch {
	case sectorSize == 0 || v == 0 || v%uint64(sectorSize) != 0:
		return fmt.Sprintf("must be a positive multiple of the %d-byte sector size, got %d", sectorSize, v)
	case v > MaxVirtualSize:
		return fmt.Sprintf("%d exceeds the 2^50-byte maximum", v)
	}
	return ""
}

func ruleSuite(s Suite) string {
	if !s.Valid() {
		return fmt.Sprintf("unknown suite %d", uint16(s))
	}
	return ""
}
