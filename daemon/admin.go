package daemon

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
)

// The admin API: JSON over HTTP on a Unix socket (admin.socket, mode 0600). docs/OPERATOR.md
// lists the calls; `sealdisk admin` is its client.
//
//	GET    /v1/status              Status
//	POST   /v1/vms                 attach: a VMRequest body
//	DELETE /v1/vms/{name}          detach
//	POST   /v1/vms/{name}/attest   AttestRequest -> the signed report envelope (docs/ATTESTATION.md)
//	POST   /v1/reload              re-read the config file and the trust store -> ReloadResult
//	GET    /metrics                Prometheus text format
//
// Errors are {"error": "..."} with 400 (bad request), 404 (no such VM), 409 (conflict: a
// name, export or ASID in use, or the image locked by another VM or process),
// 422 (the PSP refused: firmware, certificate, trust), 503 (shutting down) or 500.

// Status is GET /v1/status.
type Status struct {
	Version    string            `json:"version"`
	Started    time.Time         `json:"started"`
	PSP        string            `json:"psp_chip_id"`
	NBD        []string          `json:"nbd_listen,omitempty"`
	FUSE       string            `json:"fuse_mountpoint,omitempty"`
	Shards     int               `json:"engine_shards"`
	VMs        []VMStatus        `json:"vms"`
	NotServing map[string]string `json:"not_attached,omitempty"` // VM -> why its last attach failed
}

// VMStatus is one attached VM.
type VMStatus struct {
	Name        string    `json:"name"`
	Source      Source    `json:"source"`
	Image       string    `json:"image"`
	Export      string    `json:"export"`
	File        string    `json:"fuse_file,omitempty"`
	ASID        uint32    `json:"asid"`
	Size        int64     `json:"size"`
	SectorSize  int       `json:"sector_size"`
	ReadOnly    bool      `json:"read_only"`
	Suite       string    `json:"suite"`
	Measurement string    `json:"measurement"`
	Attached    time.Time `json:"attached"`
	// MappedBytes is how much of the image file reads copy from a mapping; 0: all use pread
	// (OPERATOR.md, "Memory").
	MappedBytes int64 `json:"mapped_bytes"`
	// Disks lists every disk of the VM (the fields above are its first disk's).
	Disks []DiskStatus `json:"disks"`
}

// DiskStatus is one disk of an attached VM.
type DiskStatus struct {
	Index       int    `json:"index"`
	Image       string `json:"image"`
	Export      string `json:"export,omitempty"` // "" for the NVRAM, or without NBD
	File        string `json:"fuse_file,omitempty"`
	NVRAM       bool   `json:"nvram,omitempty"`
	KeySlot     uint32 `json:"key_slot"` // the engine key slot under the VM's ASID
	Size        int64  `json:"size"`
	ReadOnly    bool   `json:"read_only"`
	MappedBytes int64  `json:"mapped_bytes"`
}

// VMRequest is POST /v1/vms: the same fields as a vms[] entry of the config file.
type VMRequest struct {
	Name     string `json:"name"`
	Image    string `json:"image"`
	Firmware string `json:"firmware"`
	ASID     int    `json:"asid,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
	Export   string `json:"export,omitempty"`
	Identity string `json:"identity,omitempty"`
	// Disks, NVRAM, NVRAMFile: as vms[].disks[], nvram, nvram_file (instead of image).
	Disks     []config.DiskConfig `json:"disks,omitempty"`
	NVRAM     string              `json:"nvram,omitempty"`
	NVRAMFile string              `json:"nvram_file,omitempty"`
}

// AttestRequest is POST /v1/vms/{name}/attest.
type AttestRequest struct {
	Nonce string `json:"nonce"`          // hex
	Disk  int    `json:"disk,omitempty"` // which of the VM's disks (0: the first)
}

// Status reports what is being served.
func (d *Daemon) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	id := d.psp.ID()
	s := Status{
		Version: d.opts.Version, Started: d.started, PSP: hex.EncodeToString(id[:]),
		NBD: d.cfg.NBD.Listen, Shards: d.eng.Shards(), VMs: []VMStatus{},
	}
	if d.mnt != nil {
		s.FUSE = d.mnt.Mountpoint()
	}
	if len(d.failures) > 0 {
		s.NotServing = map[string]string{}
		for k, v := range d.failures {
			s.NotServing[k] = v
		}
	}
	for _, a := range d.vms {
		first := a.Disks[0]
		v := VMStatus{
			Name: a.Config.Name, Source: a.Source, Image: first.Config.Image, Export: exportOf(first),
			ASID: uint32(a.Launch.ASID), Size: first.Dev.Size(), SectorSize: first.Dev.SectorSize(),
			ReadOnly: first.Dev.Caps().ReadOnly, Suite: a.Launch.Suite.String(),
			Measurement: a.Launch.MeasureAlg.String() + ":" + hex.EncodeToString(a.Launch.Measurement),
			Attached:    a.Attached, MappedBytes: first.Dev.Mapped(),
		}
		for _, ad := range a.Disks {
			ds := DiskStatus{Index: ad.Index, Image: ad.Config.Image, Export: exportOf(ad), NVRAM: ad.Config.NVRAM,
				KeySlot: uint32(ad.Launch.Slot), Size: ad.Dev.Size(), ReadOnly: ad.Dev.Caps().ReadOnly, MappedBytes: ad.Dev.Mapped()}
			if d.mnt != nil {
				ds.File = d.mnt.Mountpoint() + "/" + ad.Config.File
			}
			if d.srv == nil {
				ds.Export = ""
			}
			v.Disks = append(v.Disks, ds)
		}
		v.File, v.Export = v.Disks[0].File, v.Disks[0].Export
		s.VMs = append(s.VMs, v)
	}
	slices.SortFunc(s.VMs, func(a, b VMStatus) int { return strings.Compare(a.Name, b.Name) })
	return s
}

func (d *Daemon) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.Status())
	})
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		var req VMRequest
		if !readJSON(w, r, &req) {
			return
		}
		vm := config.VMConfig{Name: req.Name, Image: req.Image, Firmware: req.Firmware, ASID: req.ASID,
			ReadOnly: req.ReadOnly, Export: req.Export, Identity: req.Identity,
			Disks: req.Disks, NVRAM: req.NVRAM, NVRAMFile: req.NVRAMFile}
		if err := d.Attach(vm); err != nil {
			writeError(w, err)
			return
		}
		for _, v := range d.Status().VMs {
			if v.Name == vm.Name {
				writeJSON(w, http.StatusCreated, v)
				return
			}
		}
		writeError(w, fmt.Errorf("VM %q was detached again before its status could be read: %w", vm.Name, ErrUnknownVM))
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		if err := d.Detach(ctx, r.PathValue("name")); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /v1/vms/{name}/attest", func(w http.ResponseWriter, r *http.Request) {
		var req AttestRequest
		if !readJSON(w, r, &req) {
			return
		}
		nonce, err := hex.DecodeString(req.Nonce)
		if err != nil {
			writeError(w, badRequest(fmt.Errorf("nonce: not hex: %w", err)))
			return
		}
		rep, err := d.Attest(r.PathValue("name"), req.Disk, nonce)
		if err != nil {
			writeError(w, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(rep)
	})
	mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 60*time.Second)
		defer cancel()
		res, err := d.Reload(ctx)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.Handle("GET /metrics", d.metrics.handler())
	return mux
}

type badRequestError struct{ error }

func (e badRequestError) Unwrap() error { return e.error }

func badRequest(err error) error { return badRequestError{err} }

// httpStatus is the admin API's one error-to-status mapper.
func httpStatus(err error) int {
	var br badRequestError
	var ke *config.KeyError
	switch {
	case errors.As(err, &br), errors.As(err, &ke), errors.Is(err, psp.ErrNonceLength):
		return http.StatusBadRequest
	case errors.Is(err, ErrUnknownVM):
		return http.StatusNotFound
	case errors.Is(err, ErrConflict), errors.Is(err, psp.ErrASIDInUse), errors.Is(err, store.ErrLocked):
		return http.StatusConflict
	case errors.Is(err, ErrClosed):
		return http.StatusServiceUnavailable
	case errors.Is(err, ErrNoReload):
		return http.StatusNotImplemented
	}
	for _, r := range pspRefusals {
		if errors.Is(err, r) {
			return http.StatusUnprocessableEntity
		}
	}
	return http.StatusInternalServerError
}

// pspRefusals are the PSP's reasons for not launching a VM: the request was understood and
// refused (422), not a server fault.
var pspRefusals = []error{
	psp.ErrUnknownProvider, psp.ErrBadSignature, psp.ErrWrongChip, psp.ErrExpired, psp.ErrNotYetValid,
	psp.ErrImageMismatch, psp.ErrFirmwareMismatch, psp.ErrASIDExhausted, psp.ErrASIDRange,
	psp.ErrKeyUnseal, psp.ErrRemoteKey, psp.ErrNoKeyBound,
}

func writeError(w http.ResponseWriter, err error) {
	writeJSON(w, httpStatus(err), map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// readJSON decodes a small JSON body strictly (unknown fields are an error naming them).
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, badRequest(fmt.Errorf("failed to read request body: %w", err)))
		return false
	}
	return true
}
