// Package psp is the platform secure processor: the chip identity (an HPKE key for sealing,
// an ECDSA P-384 attestation key endorsed by a vendor root), the trust store of provider keys,
// firmware measurement, certificate verification and opening, the ASID pool, key binding into
// the engine, and signed attestation reports (docs/ATTESTATION.md, docs/THREAT-MODEL.md).
//
// The PSP never sees guest data; the engine never sees a certificate. Keys cross from here to
// the engine only through KeyBinder, and the PSP zeroises its own copy once LoadKey returns.
//
// # Directories
//
// A vendor directory (InitVendor, LoadVendor): vendor.key (PKCS#8 PEM, ECDSA P-384, 0600) and
// vendor.crt (self-signed CA, 10 years). A real deployment uses its vendor's root instead.
//
// A PSP directory (InitChip, Open):
//
//	kem.key     HPKE private key, PEM type "SEALDISK HPKE PRIVATE KEY", header "KEM: <id>" (0600)
//	attest.key  ECDSA P-384 attestation key, PKCS#8 PEM (0600)
//	chip.crt    the attestation key's certificate, issued by the vendor root
//	vendor.crt  a copy of the vendor root, for chain building
//	trust/*.pub provider public keys (PKIX PEM; ECDSA P-384 or Ed25519)
//
// Open refuses a private key file whose mode grants group or others any access
// (ErrKeyFileMode, naming the file), a chip.crt that does not endorse kem.key or attest.key,
// and a chip.crt not signed by vendor.crt.
//
// # Chip certificate
//
// Subject CN is the chip id in hex: SHA-256 of the HPKE public key bytes (FORMAT.md §3.3).
// The public key is the attestation key. The non-critical extension OIDChipKEM,
// 1.3.6.1.4.1.59999.1.1, holds an OCTET STRING: u16 KEM id (big-endian; 0x647a
// ML-KEM-768+X25519 by default, 0x0011 DHKEM(P-384)) || the KEM's serialized public key.
// Providers read the sealing key from there (ParseChipCert) after checking the chain
// (ChipCert.VerifyChain).
//
// # Verification order
//
// VerifyCertificate, UnsealImageKey and Launch follow FORMAT.md §3.4 and stop at the first
// refusal, each with its own sentinel: ErrUnknownProvider, ErrBadSignature, ErrWrongChip,
// ErrNotYetValid / ErrExpired, ErrImageMismatch (format's, naming the field),
// ErrFirmwareMismatch (Launch only, before any key is unwrapped or any ASID taken),
// ErrRemoteKey (the certificate names a key broker and this PSP has no broker client, or an
// offline tool was asked to unseal it) and ErrKeyUnseal. Launch then needs a free ASID (ErrASIDExhausted, ErrASIDInUse, ErrASIDRange);
// Detach and Attest need a bound one (ErrNoKeyBound).
//
// A VM with several disks launches each: disk 0 takes the VM's ASID (its key slot is the ASID),
// disk N in 1..MaxDisks-1 takes key slot KeySlot(ASID, N) under the ASID that disk 0 of the
// same VM holds (ErrNoKeyBound otherwise, so no VM puts a key under another's ASID). Detach
// takes a launch's Slot; the ASID itself is refused while a disk slot under it is held.
//
// # Attestation reports
//
// Attest signs, with the attestation key, a JSON report about a bound launch for a caller's
// nonce (16..64 bytes). The body is serialised once:
//
//	{"version":1, "chip_id":hex, "vm":string, "asid":n, "firmware_measurement":hex,
//	 "measure_alg":"sha384"|"sm3", "firmware_verdict":"match", "cert_digest":hex SHA-384 of
//	 the certificate bytes, "signature_verdict":"valid", "suite":name, "image_uuid":uuid,
//	 "time":RFC 3339 UTC, "nonce":hex}
//
// and carried verbatim in an envelope {"body": base64 body bytes, "signature": base64 ASN.1
// ECDSA P-384 over SHA-384(body), "chain": [chip.crt PEM]}. VerifyReport checks, in order,
// the envelope's shape (ErrReportFormat), the chain to the verifier's vendor root
// (ErrReportChain), the signature and that the body names the certificate's chip
// (ErrReportSignature), and the nonce in constant time (ErrReportNonce). docs/ATTESTATION.md
// is the reference for verifiers.
//
// # Remote keys
//
// A certificate with the remote flag is opened through Options.Fetcher (remote.go; the
// broker package's Client): after steps 2–7 the PSP signs a report of the launch over the
// broker's nonce, and opens the broker's release (a grant and the key HPKE-sealed to this
// chip, ReleaseInfo) after checking the grant names this image, key id, chip and nonce and a
// lease that has not ended. keycache.go keeps the key for the lease (single flight, renewal,
// zeroised at the lease end or the last Detach; an expired lease clears the VMs' engine slots
// and calls Options.OnLeaseEnd). docs/BROKER.md is the protocol.
package psp
