# portguard — build, test, demo, bench.
# Every target that needs root or system packages calls `make deps` first, so each
# command in the README works on a fresh Debian machine as root.

GO        ?= go
GOBIN_DIR := $(shell $(GO) env GOPATH)/bin
BIN       := $(CURDIR)/bin
CNI_BIN   ?= /opt/cni/bin
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/portguard/portguard/pkg/buildinfo.Version=$(VERSION)

# Upstream pieces used by the test bed, the demo and the benchmark.
CNITOOL_VERSION ?= v1.3.0
PLUGINS_VERSION ?= v1.10.0

export PORTGUARD_BIN_DIR   := $(BIN)
export PORTGUARD_UPSTREAM_DIR := $(GOBIN_DIR)

.PHONY: all build deps apt-deps go-tools test unit e2e install demo bench stress clean

all: build

build:
	mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/portguard ./plugins/portguard
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/portguardctl ./cmd/portguardctl

# System packages the kernel tests and the demo use.
apt-deps:
	@missing=""; for c in iptables ip6tables iptables-restore socat conntrack ip; do \
		command -v $$c >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			iptables iproute2 socat conntrack >/dev/null; \
	fi

# cnitool and the upstream plugins: bridge and host-local for the test bed, portmap for
# comparison, bandwidth/firewall/tuning because the conflist examples chain them.
go-tools:
	@test -x $(GOBIN_DIR)/cnitool || $(GO) install github.com/containernetworking/cni/cnitool@$(CNITOOL_VERSION)
	@for p in main/bridge ipam/host-local meta/portmap meta/bandwidth meta/firewall meta/tuning; do \
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

install: build
	install -d $(CNI_BIN)
	install -m 0755 $(BIN)/portguard $(CNI_BIN)/portguard
	@if [ -n "$(AS_PORTMAP)" ]; then install -m 0755 $(BIN)/portguard $(CNI_BIN)/portmap; \
		echo "installed as $(CNI_BIN)/portmap too"; fi
	install -d /usr/local/bin
	install -m 0755 $(BIN)/portguardctl /usr/local/bin/portguardctl

demo: deps build
	bash test/demo/demo.sh

bench: deps build
	$(GO) run ./test/bench $(BENCH_ARGS)

stress: deps build
	PORTGUARD_STRESS_OPS=5000 $(GO) test -count=1 -timeout 60m -run 'TestCrash' -v ./test/stress/

clean:
	rm -rf $(BIN)
