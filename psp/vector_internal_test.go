package psp

import (
	"crypto"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/tree"
)

// TestRootVectors pins the integrity tree's digests and a root record's body and PSP MAC
// (FORMAT.md §10.4): the same bytes must come out of every implementation.
func TestRootVectors(t *testing.T) {
	uuid := [16]byte{0x5e, 0xa1, 0xd1, 0x5c, 6: 0x40, 8: 0x80, 15: 1}
	page := make([]byte, format.MetaPageSize)
	for i := range page {
		page[i] = byte(i % 251)
	}
	leaf := tree.LeafDigest(uuid, 7, page)
	var n tree.Node
	n[0], n[5] = leaf, leaf
	node := tree.NodeDigest(uuid, 1, 0, &n)
	rec := &format.RootRecord{Auth: format.RootByPSP, UUID: uuid, Seq: 3, Counter: 42, Epoch: 2, Head: 8192,
		HeadDigest: sha256.Sum256([]byte("head")), Root: node, TreeArity: 128, TreeLevels: 2}
	body := rec.MarshalBody()
	rootKey := make([]byte, 32)
	for i := range rootKey {
		rootKey[i] = byte(i)
	}
	p := &PSP{rootKey: rootKey, trust: map[string]crypto.PublicKey{"k": ed25519.PublicKey(make([]byte, 32))}}
	r, err := p.rootsFor(&format.Certificate{UUID: uuid, ProviderKey: []byte("k")})
	if err != nil {
		t.Fatal(err)
	}
	bd := sha256.Sum256(body)
	got := map[string]string{
		"leaf":        hex.EncodeToString(leaf[:]),
		"node":        hex.EncodeToString(node[:]),
		"body sha256": hex.EncodeToString(bd[:]),
		"mac":         hex.EncodeToString(r.SealRoot(body)),
		"empty page":  hex.EncodeToString(func() []byte { d := tree.LeafDigest(uuid, 7, make([]byte, format.MetaPageSize)); return d[:] }()),
		"empty node":  hex.EncodeToString(func() []byte { d := tree.NodeDigest(uuid, 1, 0, &tree.Node{}); return d[:] }()),
		"body length": hex.EncodeToString([]byte{byte(len(body))}),
	}
	want := map[string]string{
		"leaf":        "4d492bd337ba24889e0b55f5a60253c5600ee3b20b5eca8e13e787d1ed906a55",
		"node":        "db6c5c9bcf0a669427571cb177a73978475fba72868a91c098d3f0039ef31ce7",
		"body sha256": "5d661784ab8ac0ec43c4190a685b376f1f41110852737a56581c2f7101da36e2",
		"mac":         "7eb2be9666bac7417e646463e79a43f01d01f4e760f88a1cafdbff29f8a378e2",
		"empty page":  "0000000000000000000000000000000000000000000000000000000000000000",
		"empty node":  "0000000000000000000000000000000000000000000000000000000000000000",
		"body length": "88",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s = %s, want %s", k, got[k], w)
		}
	}
}
