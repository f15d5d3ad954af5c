package main

import (
	"errors"
	"fmt"

	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/psp"
)

// readImageKeyFile reads a 32-byte raw image key from a file of mode 0600 (what `broker put
// --key-out` writes).
func readImageKeyFile(path string) ([]byte, error) {
	b, err := psp.ReadPrivateFile(path)
	if err != nil {
		return nil, fmt.Errorf("--key-file: %w", err)
	}
	if len(b) != 32 {
		clear(b)
		return nil, fmt.Errorf("--key-file %s: %d bytes, want 32 raw bytes", path, len(b))
	}
	return b, nil
}

// offlineKey is the image key for an offline tool: unsealed by the PSP, or, for an image whose
// key is in a broker (which releases it only to a launch), read from keyFile after the PSP
// has checked the certificate. The caller zeroises it.
func offlineKey(p *psp.PSP, img *image.Image, keyFile string) ([]byte, error) {
	if !img.Cert.Remote {
		if keyFile != "" {
			return nil, errors.New("--key-file is only for images whose key is in a key broker")
		}
		return p.UnsealImageKey(img.Cert, img.Header)
	}
	if keyFile == "" {
		_, err := p.UnsealImageKey(img.Cert, img.Header)
		return nil, fmt.Errorf("%w; pass the image key with --key-file", err)
	}
	if _, err := p.VerifyCertificate(img.Cert, img.Header); err != nil {
		return nil, err
	}
	return readImageKeyFile(keyFile)
}
