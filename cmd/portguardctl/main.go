// Command portguardctl audits and repairs host-port state on a node.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "portguardctl: not built yet")
	os.Exit(2)
}
