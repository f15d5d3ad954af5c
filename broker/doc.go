// Package broker is the remote key broker (docs/BROKER.md): it keeps image keys
// sealed at rest to its own key, and releases one to a PSP only against a fresh attestation
// report that passes the key id's declarative policy, HPKE-sealed to the attested chip.
//
// One replica keeps no session: a challenge nonce authenticates itself (nonce.go), the replay
// store and the audit log live in the store directory that replicas share (nonce.go,
// audit.go), and the key files are replaced atomically (keystore.go). server.go is the HTTPS
// protocol and the order of checks; client.go is the PSP's side (a psp.KeyFetcher).
package broker
