package main

import (
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/store/locate"
	"github.com/sealdisk/sealdisk/store/rbd"
)

// cephConfig reaches the cluster of rbd:POOL/IMAGE locations: --ceph-conf, --ceph-id and
// --ceph-keyring (config ceph.*), set from the loaded config before any command runs.
var cephConfig rbd.Config

// openImage opens the image at loc, a file or rbd:POOL/IMAGE.
func openImage(loc string, readOnly bool) (*image.Image, error) {
	s, err := locate.Open(loc, readOnly, cephConfig)
	if err != nil {
		return nil, err
	}
	return image.OpenStore(s)
}
