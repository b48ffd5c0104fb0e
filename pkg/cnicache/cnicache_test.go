package cnicache

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/portguard/portguard/pkg/hostport"
)

func TestOwnersReadsLibcniCache(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "results"), 0o755)
	write := func(name, body string) {
		os.WriteFile(filepath.Join(dir, "results", name), []byte(body), 0o600)
	}
	write("net-a-eth0", `{"kind":"cniCacheV1","containerId":"a","networkName":"net","ifName":"eth0"}`)
	write("net-a-eth1", `{"kind":"cniCacheV1","containerId":"a","networkName":"net","ifName":"eth1"}`)
	write("other-b-eth0", `{"kind":"cniCacheV1","containerId":"b","networkName":"other","ifName":"eth0"}`)
	write("net-bad-eth0", `{"kind":"cniCacheV1","containerId":"x\" -j ACCEPT","networkName":"net"}`)
	write("garbage", `not json`)
	got := Owners(dir, "net")
	if len(got) != 1 || got[0].ContainerID != "a" {
		t.Fatalf("owners %v", got)
	}
	if len(Owners(filepath.Join(dir, "nope"), "net")) != 0 {
		t.Fatal("missing cache dir")
	}
}

// A FIFO, a symbolic link (to a device that never ends) and an oversized file in the cache
// are skipped without blocking or reading them whole.
func TestHostileCacheFilesSkipped(t *testing.T) {
	dir := t.TempDir()
	res := filepath.Join(dir, "results")
	os.MkdirAll(res, 0o755)
	if err := syscall.Mkfifo(filepath.Join(res, "net-a-eth0"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/zero", filepath.Join(res, "net-a-eth1")); err != nil {
		t.Fatal(err)
	}
	big := append([]byte(`{"kind":"cniCacheV1","containerId":"a","networkName":"net","ifName":"eth2"} `), make([]byte, maxFile)...)
	os.WriteFile(filepath.Join(res, "net-a-eth2"), big, 0o600)
	os.WriteFile(filepath.Join(res, "net-a-eth3"), []byte(`{"kind":"cniCacheV1","containerId":"a","networkName":"net","ifName":"eth3"}`), 0o600)
	done := make(chan []Entry)
	go func() { done <- Lookup(dir, hostport.Owner{Network: "net", ContainerID: "a"}) }()
	select {
	case got := <-done:
		if len(got) != 1 || got[0].IfName != "eth3" {
			t.Errorf("entries %+v, want only the regular eth3 file", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Lookup blocked on a FIFO or an endless file")
	}
	// Names outside the grammar never become a pattern.
	if got := Lookup(dir, hostport.Owner{Network: "../..", ContainerID: "*"}); got != nil {
		t.Errorf("hostile owner found %v", got)
	}
}

// An owner without a network (an upstream nftables rule names only the container ID)
// finds the container's attachments in every network; a named owner only its own.
func TestLookupWithoutNetwork(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "results"), 0o755)
	write := func(name, body string) {
		os.WriteFile(filepath.Join(dir, "results", name), []byte(body), 0o600)
	}
	write("net-a-eth0", `{"kind":"cniCacheV1","containerId":"a","networkName":"net","ifName":"eth0"}`)
	write("other-a-eth0", `{"kind":"cniCacheV1","containerId":"a","networkName":"other","ifName":"eth0"}`)
	write("net-b-eth0", `{"kind":"cniCacheV1","containerId":"b","networkName":"net","ifName":"eth0"}`)
	if got := Lookup(dir, hostport.Owner{ContainerID: "a"}); len(got) != 2 {
		t.Errorf("owner a without network: %d entries, want 2: %v", len(got), got)
	}
	if got := Lookup(dir, hostport.Owner{Network: "net", ContainerID: "a"}); len(got) != 1 {
		t.Errorf("owner net/a: %d entries, want 1: %v", len(got), got)
	}
	if got := Lookup(dir, hostport.Owner{ContainerID: "c"}); len(got) != 0 {
		t.Errorf("owner c: %v, want none", got)
	}
}
