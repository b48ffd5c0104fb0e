package cnicache

import (
	"os"
	"path/filepath"
	"testing"
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
