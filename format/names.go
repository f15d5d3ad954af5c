package format

import "fmt"

func (s Suite) String() string {
	switch s {
	case SuiteAES256GCM:
		return "aes-256-gcm"
	case SuiteChaCha20Poly1305:
		return "chacha20-poly1305"
	case SuiteSM4GCM:
		return "sm4-gcm"
	}
	return fmt.Sprintf("suite(%d)", uint16(s))
}

// Valid reports whether s is a suite this version knows.
func (s Suite) Valid() bool { return s >= SuiteAES256GCM && s <= SuiteSM4GCM }

// ParseSuite maps a suite name (as printed by String) to its id. The short forms "aes",
// "chacha20" and "sm4" are accepted too, as FORMAT.md §4.1 writes `--suite sm4`.
func ParseSuite(name string) (Suite, error) {
	switch name {
	case "aes":
		return SuiteAES256GCM, nil
	case "chacha20":
		return SuiteChaCha20Poly1305, nil
	case "sm4":
		return SuiteSM4GCM, nil
	}
	for s := SuiteAES256GCM; s <= SuiteSM4GCM; s++ {
		if s.String() == name {
			return s, nil
		}
	}
	return 0, fmt.Errorf("unknown data suite %q (want aes-256-gcm, chacha20-poly1305 or sm4-gcm)", name)
}

func (a MeasureAlg) String() string {
	switch a {
	case MeasureSHA384:
		return "sha384"
	case MeasureSM3:
		return "sm3"
	}
	return fmt.Sprintf("measure-alg(%d)", uint16(a))
}

// Valid reports whether a is a measurement algorithm this version knows.
func (a MeasureAlg) Valid() bool { return a.DigestSize() != 0 }

// DigestSize is the measurement length in bytes, 0 for an unknown algorithm.
func (a MeasureAlg) DigestSize() int {
	switch a {
	case MeasureSHA384:
		return 48
	case MeasureSM3:
		return 32
	}
	return 0
}

// ParseMeasureAlg maps "sha384" or "sm3" to its id.
func ParseMeasureAlg(name string) (MeasureAlg, error) {
	switch name {
	case "sha384":
		return MeasureSHA384, nil
	case "sm3":
		return MeasureSM3, nil
	}
	return 0, fmt.Errorf("unknown measurement algorithm %q (want sha384 or sm3)", name)
}

func (a SigAlg) String() string {
	switch a {
	case SigECDSAP384:
		return "ecdsa-p384"
	case SigEd25519:
		return "ed25519"
	}
	return fmt.Sprintf("sig-alg(%d)", uint16(a))
}

// Valid reports whether a is a provider signature algorithm this version knows.
func (a SigAlg) Valid() bool { return a == SigECDSAP384 || a == SigEd25519 }

// ParseSigAlg maps "ecdsa-p384" or "ed25519" to its id.
func ParseSigAlg(name string) (SigAlg, error) {
	switch name {
	case "ecdsa-p384":
		return SigECDSAP384, nil
	case "ed25519":
		return SigEd25519, nil
	}
	return 0, fmt.Errorf("unknown provider signature algorithm %q (want ecdsa-p384 or ed25519)", name)
}

// KEMName names an HPKE KEM id used in certificates.
func KEMName(id uint16) string {
	switch id {
	case KEMMLKEM768X25519:
		return "mlkem768-x25519"
	case KEMDHKEMP384:
		return "dhkem-p384"
	}
	return fmt.Sprintf("kem(0x%04x)", id)
}
