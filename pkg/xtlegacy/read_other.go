//go:build !(linux && (amd64 || arm64 || ppc64le || riscv64 || s390x || loong64 || mips64 || mips64le))

package xtlegacy

import "github.com/portguard/portguard/pkg/hostport"

func socket(hostport.Family) (int, error)          { return -1, nil }
func closeSocket(int)                              {}
func entries(int, hostport.Family) ([]byte, error) { return nil, ErrUnsupported }
