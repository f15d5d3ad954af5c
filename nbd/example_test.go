package nbd_test

import (
	"context"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/nbd"
)

// Serve a 1 GiB in-memory disk on a Unix socket until interrupted; clients connect with
// nbd+unix:///vm1?socket=/run/sealdisk/nbd.sock.
func ExampleServer() {
	srv := nbd.NewServer(nbd.Options{})
	err := srv.AddExport(nbd.Export{
		Name:        "vm1",
		Description: "vm1 system disk",
		Device:      engine.NewMemDevice(1<<30, false),
	})
	if err != nil {
		log.Fatal(err)
	}
	ln, err := nbd.ListenUnix(filepath.Join(os.TempDir(), "nbd.sock"), 0)
	if err != nil {
		log.Fatal(err)
	}
	go srv.Serve(context.Background(), ln)

	// ... on SIGTERM: finish in-flight requests, flush, close.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Print(err)
	}
}
