package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
)

// world is the shared fixture's world with two chips (ML-KEM and DHKEM) trusting one
// provider.
type world struct{ *fixture.World }

func newWorld(t *testing.T) *world {
	t.Helper()
	fw, err := fixture.NewWorld(t.TempDir(), fixture.Options{KEM: format.KEMMLKEM768X25519, SecondChip: true, SecondKEM: format.KEMDHKEMP384})
	must(t, err)
	return &world{fw}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// issue signs a certificate for chipDir with the world's provider.
func (w *world) issue(t *testing.T, chipDir string, id [16]byte, vs uint64, ss uint32, suite format.Suite, key []byte) *format.Certificate {
	t.Helper()
	chip := w.Chip
	if chipDir == w.Chip2Dir {
		chip = w.Chip2
	}
	c, err := provider.Issue(w.Provider, provider.IssueRequest{
		Chip: chip, UUID: id, VirtualSize: vs, SectorSize: ss, Suite: suite,
		MeasureAlg: format.MeasureSHA384, Measurements: [][]byte{w.FirmwareDigest},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), ImageKey: key,
	})
	must(t, err)
	return c
}

// create makes an empty image sealed to the world's first chip and returns it open for
// writing, with the cipher the PSP unseals from its certificate.
func (w *world) create(t *testing.T, vs uint64, ss uint32, suite format.Suite) (*Image, *sector.Cipher, string) {
	t.Helper()
	id := uuid.New()
	key := make([]byte, sector.KeySize)
	rand.Read(key)
	cert := w.issue(t, w.ChipDir, id, vs, ss, suite, key)
	h, err := format.NewHeader(id, vs, ss, suite, false, format.Layout{}, cert.Bytes())
	must(t, err)
	path := filepath.Join(w.Dir, uuid.NewString()+".img")
	img, err := Create(path, h)
	must(t, err)
	t.Cleanup(func() { img.Close() })
	return img, w.cipher(t, img, w.ChipDir), path
}

// cipher unseals img's key with the PSP in dir, as unseal does.
func (w *world) cipher(t *testing.T, img *Image, dir string) *sector.Cipher {
	t.Helper()
	p, err := psp.Open(dir, psp.Options{})
	must(t, err)
	key, err := p.UnsealImageKey(img.Cert, img.Header)
	must(t, err)
	c, err := sector.NewCipher(img.Cert.Suite, key, img.Cert.UUID, int(img.Cert.SectorSize))
	must(t, err)
	t.Cleanup(c.Destroy)
	return c
}

// writeFile writes data to a new file in dir and returns it open.
func writeFile(t *testing.T, dir string, data []byte) *os.File {
	t.Helper()
	f, err := os.CreateTemp(dir, "raw")
	must(t, err)
	t.Cleanup(func() { f.Close() })
	_, err = f.Write(data)
	must(t, err)
	return f
}

// sealBytes seals data into a fresh image and reopens it read-only.
func (w *world) sealBytes(t *testing.T, data []byte, ss uint32, suite format.Suite) (*Image, *sector.Cipher, string) {
	t.Helper()
	vs := format.RoundUpVirtualSize(uint64(len(data)), ss)
	img, c, path := w.create(t, vs, ss, suite)
	sess, err := c.NewSession()
	must(t, err)
	must(t, Seal(context.Background(), writeFile(t, w.Dir, data), img, sess, nil))
	must(t, img.Close())
	img, err = Open(path, true)
	must(t, err)
	t.Cleanup(func() { img.Close() })
	return img, c, path
}

// unsealBytes unseals img (replaying its journal in memory) and returns the output.
func unsealBytes(t *testing.T, img *Image, c *sector.Cipher) ([]byte, error) {
	t.Helper()
	ov, _, err := Recover(img, c)
	must(t, err)
	out, err := os.CreateTemp(t.TempDir(), "out")
	must(t, err)
	defer out.Close()
	if err := Unseal(context.Background(), img, c, ov, out, nil); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(out)
	must(t, err)
	return b, nil
}

// randomSectors returns n bytes of random data in which every third sector is zero, so
// runs of written and skipped sectors alternate.
func randomSectors(n, ss int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	for off := 0; off < n; off += 3 * ss {
		clear(b[off:min(off+ss, n)])
	}
	return b
}

// fileHash hashes [from, to) of path.
func fileHash(t *testing.T, path string, from, to int64) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, io.NewSectionReader(f, from, to-from))
	must(t, err)
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	b := []byte{0}
	_, err = f.ReadAt(b, off)
	must(t, err)
	b[0] ^= 0x5a
	_, err = f.WriteAt(b, off)
	must(t, err)
}

func padded(data []byte, ss int) []byte {
	n := (len(data) + ss - 1) / ss * ss
	return append(bytes.Clone(data), make([]byte, n-len(data))...)
}
