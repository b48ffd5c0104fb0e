// Command pause is the sandbox ("pause") image of the containerd tests in test/cri: it holds
// the pod's namespaces like registry.k8s.io/pause, and also answers on TCP so a test can tell
// which pod a host port reaches. Every connection gets the pod's hostname and a newline, then
// is closed. It exits 0 on SIGTERM or SIGINT (what containerd sends on StopPodSandbox).
//
//	pause [-port 80]
//
// Built static (CGO_ENABLED=0) by the tests and packed as the only file of an OCI image.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	port := flag.Int("port", 80, "TCP port to answer on (every address, both families)")
	flag.Parse()
	name, err := os.Hostname()
	if err != nil {
		name = "unknown"
	}
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", *port))
	if err != nil {
		fmt.Fprintln(os.Stderr, "pause:", err)
		os.Exit(1)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, name)
			c.Close()
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
