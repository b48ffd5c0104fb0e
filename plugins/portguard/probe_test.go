package main

import (
	"os"
	"path/filepath"
	"testing"

	nftbackend "github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/config"
)

// Without the backend key the plugin keeps iptables while an iptables binary is in PATH,
// and picks nftables when there is none and nf_tables answers (upstream's rule).
func TestProbeBackend(t *testing.T) {
	with := t.TempDir()
	if err := os.WriteFile(filepath.Join(with, "iptables"), []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", with)
	if got := probeBackend(); got != config.BackendIPTables {
		t.Errorf("iptables in PATH: backend %q, want iptables", got)
	}
	t.Setenv("PATH", t.TempDir())
	want := config.BackendNFTables
	if nftbackend.New().Status() != nil {
		want = config.BackendIPTables // nf_tables unusable here (no root): iptables stays
	}
	if got := probeBackend(); got != want {
		t.Errorf("no iptables in PATH: backend %q, want %q", got, want)
	}
}
