// Package image opens, creates and converts sealed image files for the offline tools
// (create, seal, unseal, inspect, reseal). The engine has its own journaled data path; this
// package does bulk, parallel, sparse-aware conversion with no journal (its outputs are new
// files, renamed into place only when complete).
package image

import (
	"fmt"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/store"
)

// Image is an open sealed image: a file or an RBD image (store.Image).
type Image struct {
	Header *format.Header
	Cert   *format.Certificate
	Status format.HeaderStatus
	Store  store.Image
}

// Open reads and checks the headers and the certificate of the image file at path; it needs
// no key.
func Open(path string, readOnly bool) (*Image, error) {
	s, err := store.OpenFile(path, readOnly)
	if err != nil {
		return nil, err
	}
	return OpenStore(s)
}

// OpenStore is Open on an opened store (a file or an RBD image); on failure it closes s.
func OpenStore(s store.Image) (*Image, error) {
	img, err := open(s)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("failed to open image %s: %w", s.Name(), err)
	}
	return img, nil
}

func open(s store.Image) (*Image, error) {
	h, st, err := format.ReadHeader(s)
	if err != nil {
		return nil, err
	}
	c, err := format.ParseCertificate(h.Cert)
	if err != nil {
		return nil, err
	}
	if err := c.CheckHeader(h); err != nil {
		return nil, err
	}
	size, err := s.Size()
	if err != nil {
		return nil, err
	}
	if uint64(size) < h.FileSize() {
		return nil, fmt.Errorf("image file is %d bytes, the header needs %d (truncated image)", size, h.FileSize())
	}
	return &Image{Header: h, Cert: c, Status: st, Store: s}, nil
}

// Create makes a new, empty (all holes) image file with generation-1 headers.
func Create(path string, h *format.Header) (*Image, error) {
	s, err := store.CreateFile(path)
	if err != nil {
		return nil, err
	}
	return CreateStore(s, h)
}

// CreateStore is Create on a new, empty store (a file or an RBD image); on failure it closes s.
func CreateStore(s store.Image, h *format.Header) (*Image, error) {
	if err := s.Truncate(int64(h.FileSize())); err != nil {
		s.Close()
		return nil, err
	}
	if err := format.WriteHeaders(s, h); err != nil {
		s.Close()
		return nil, fmt.Errorf("failed to create image %s: %w", s.Name(), err)
	}
	c, err := format.ParseCertificate(h.Cert)
	if err != nil {
		s.Close()
		return nil, err
	}
	return &Image{Header: h, Cert: c, Store: s}, nil
}

// Close closes the file.
func (img *Image) Close() error { return img.Store.Close() }

// FellBack reports whether the primary header was unusable and the backup was used.
func (img *Image) FellBack() bool { return img.Status.Copy == 1 }

// Rewrite replaces the certificate, rewriting only the two header copies (reseal).
func (img *Image) Rewrite(cert []byte) error {
	h := *img.Header
	h.Cert = cert
	h.Generation++
	if err := h.Validate(); err != nil {
		return err
	}
	c, err := format.ParseCertificate(cert)
	if err != nil {
		return err
	}
	if err := c.CheckHeader(&h); err != nil {
		return err
	}
	if err := format.WriteHeaders(img.Store, &h); err != nil {
		return err
	}
	img.Header, img.Cert = &h, c
	return nil
}

// Reseal replaces the certificate of the image at path with newCert (which must bind the
// same image: UUID, size, sector size, suite, read-only flag), rewriting only the two header
// copies with the next generation (FORMAT.md §2 "Rewriting"). Data, metadata and journal are
// not touched.
func Reseal(path string, newCert []byte) error {
	s, err := store.OpenFile(path, false)
	if err != nil {
		return err
	}
	return ResealStore(s, newCert)
}

// ResealStore is Reseal on an opened store, which it closes.
func ResealStore(s store.Image, newCert []byte) error {
	path := s.Name()
	img, err := OpenStore(s)
	if err != nil {
		return err
	}
	err = img.Rewrite(newCert)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("failed to reseal %s: %w", path, err)
	}
	return nil
}

// AllocatedData returns the bytes allocated in the data region (holes excluded), found with
// the store's Extents (SEEK_DATA/SEEK_HOLE, rbd diff); where the store cannot tell it is the
// region's size.
func (img *Image) AllocatedData() (int64, error) {
	h := img.Header
	ext, err := img.Store.Extents(int64(h.DataOffset), int64(h.FileSize()))
	if err != nil {
		return 0, err
	}
	var n int64
	for _, e := range ext {
		n += e[1] - e[0]
	}
	return n, nil
}
