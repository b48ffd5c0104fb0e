# portguard — build, test, demo, bench.
# Every target that needs root or system packages calls `make deps` first, so each
# command in the README works on a fresh Debian machine as root.

GO        ?= go
GOBIN_DIR := $(shell $(GO) env GOPATH)/bin
BIN       := $(CURDIR)/bin
CNI_BIN   ?= /opt/cni/bin
# VERSION: the semver tag (v0.1.0) on a tagged commit, git describe's v0.1.0-3-gabcdef0 between
# tags, -dirty for a modified tree. COMMIT: the full hash. Both end up in pkg/buildinfo.
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT    ?= $(shell git rev-parse HEAD 2>/dev/null)
# Expanded once, so every binary of one `make release` carries the same pair.
VERSION   := $(VERSION)
COMMIT    := $(COMMIT)
LDFLAGS   := -X github.com/portguard/portguard/pkg/buildinfo.Version=$(VERSION) \
             -X github.com/portguard/portguard/pkg/buildinfo.Commit=$(COMMIT)
# make release: the platforms of the static binaries in dist/.
RELEASE_PLATFORMS ?= linux/amd64 linux/arm64
DIST      := $(CURDIR)/dist

# Upstream pieces used by the test bed, the demo and the benchmark.
CNITOOL_VERSION ?= v1.3.0
PLUGINS_VERSION ?= v1.10.0

export PORTGUARD_BIN_DIR   := $(BIN)
export PORTGUARD_UPSTREAM_DIR := $(GOBIN_DIR)

.PHONY: all build deps apt-deps go-tools test unit e2e install uninstall verify-install release ldflags demo bench stress clean

all: build

build:
	mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/portguard ./plugins/portguard
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/portguardctl ./cmd/portguardctl
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/portguard-agent ./cmd/portguard-agent

# System packages the kernel tests and the demo use; busybox runs deploy/install.sh with the
# smallest POSIX tools (deploy/install_test.go); nft lists and edits the nftables backend's table in
# its kernel tests (the backend itself talks netlink and needs no nft binary); containerd
# (1.6 in Debian 12) and runc run the pods of test/cri, created through CRI as kubelet does
# (the tests start their own containerd; the package's service is not needed); nsenter and
# unshare (util-linux) put it in the test's namespaces, setpriv runs the agent with the
# DaemonSet's capabilities.
apt-deps:
	@missing=""; for c in iptables ip6tables iptables-restore socat conntrack ip busybox nft \
		containerd containerd-shim-runc-v2 ctr runc nsenter unshare setpriv; do \
		command -v $$c >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			iptables iproute2 socat conntrack busybox nftables containerd runc util-linux >/dev/null; \
	fi

# cnitool and the upstream plugins: bridge and host-local for the test bed, portmap for
# comparison, bandwidth/firewall/tuning because the conflist examples chain them, loopback
# because containerd's CRI sets up every pod's lo with it (test/cri).
go-tools:
	@test -x $(GOBIN_DIR)/cnitool || $(GO) install github.com/containernetworking/cni/cnitool@$(CNITOOL_VERSION)
	@for p in main/bridge main/loopback ipam/host-local meta/portmap meta/bandwidth meta/firewall meta/tuning; do \
		test -x $(GOBIN_DIR)/$$(basename $$p) || \
		$(GO) install github.com/containernetworking/plugins/plugins/$$p@$(PLUGINS_VERSION) || exit 1; \
	done

deps: apt-deps go-tools

unit:
	$(GO) vet ./...
	$(GO) test -count=1 ./pkg/... ./plugins/... ./cmd/...

e2e: deps build
	$(GO) test -count=1 -timeout 15m ./test/...

# The whole suite: unit, kernel and end-to-end tests (root required for the last two).
test: deps build
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 20m ./...

# install / uninstall / verify-install: deploy/install.sh does the work (the same script the
# DaemonSet runs), so what the tests check is what runs on a node. AS_PORTMAP=1 also installs
# portguard as $(CNI_BIN)/portmap and keeps the upstream binary as portmap.pre-portguard;
# uninstall puts it back (one rename) and removes every file install wrote.
PREFIX ?= /usr/local
install: build
	PORTGUARD_SRC=$(BIN)/portguard PORTGUARD_AS_PORTMAP=$(if $(AS_PORTMAP),true,false) \
		sh deploy/install.sh install $(CNI_BIN)
	install -d $(PREFIX)/bin
	install -m 0755 $(BIN)/portguardctl $(PREFIX)/bin/portguardctl

uninstall:
	sh deploy/install.sh uninstall $(CNI_BIN)
	rm -f $(PREFIX)/bin/portguardctl

verify-install:
	PORTGUARD_SRC=$(BIN)/portguard PORTGUARD_AS_PORTMAP=$(if $(AS_PORTMAP),true,false) \
		sh deploy/install.sh verify $(CNI_BIN)

# Static binaries for every RELEASE_PLATFORMS entry in dist/, each with its `go version -m`
# build info (<binary>.buildinfo), and SHA256SUMS over all of them. Refuses a modified tree
# (the commit in the binaries would not describe them) unless ALLOW_DIRTY=1.
release:
	@case "$(VERSION)" in *-dirty) if [ -z "$(ALLOW_DIRTY)" ]; then \
		echo "make release: the tree has uncommitted changes ($(VERSION)); commit them or set ALLOW_DIRTY=1" >&2; exit 1; fi;; esac
	rm -rf $(DIST)
	mkdir -p $(DIST)
	@set -e; for p in $(RELEASE_PLATFORMS); do os=$${p%/*}; arch=$${p#*/}; \
		for cmd in plugins/portguard cmd/portguardctl cmd/portguard-agent; do \
			out=$(DIST)/$$(basename $$cmd)-$(VERSION)-$$os-$$arch; \
			echo "build $$out"; \
			CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -buildvcs=false -ldflags '$(LDFLAGS)' -o $$out ./$$cmd; \
			$(GO) version -m $$out > $$out.buildinfo; \
		done; done
	cd $(DIST) && sha256sum $$(ls | grep -v '^SHA256SUMS$$') > SHA256SUMS
	@cat $(DIST)/SHA256SUMS

# The linker flags build and release use (tests build with them too).
ldflags:
	@echo '$(LDFLAGS)'

# DEMO_BACKEND: iptables, nftables or both (the stories one after the other).
DEMO_BACKEND ?= both
demo: deps build
	DEMO_BACKEND=$(DEMO_BACKEND) bash test/demo/demo.sh

# Both comparisons: portguard vs upstream portmap on iptables, then portguard's nftables
# backend vs upstream's (BENCH_NFT_ARGS; test/bench/README.md). BENCH_NFT_ARGS=skip skips it;
# BENCH_ARGS=-quick makes both quick.
BENCH_NFT_ARGS ?= $(if $(findstring -quick,$(BENCH_ARGS)),-quick,-n 0,1000,5000 -runs 9)
bench: deps build
	$(GO) run ./test/bench $(BENCH_ARGS)
	if [ "$(BENCH_NFT_ARGS)" != skip ]; then $(GO) run ./test/bench -backend nftables $(BENCH_NFT_ARGS); fi

stress: deps build
	PORTGUARD_STRESS_OPS=5000 $(GO) test -count=1 -timeout 60m -run 'TestCrash' -v ./test/stress/

clean:
	rm -rf $(BIN) $(DIST)
