package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/portguard/portguard/pkg/buildinfo"
)

const versionHelp = `Usage: portguardctl version [-o text|json]

Prints the version and the git commit this portguardctl was built from, and the Go toolchain
that built it. "make build" and "make release" stamp both in; a plain "go build" inside a git
checkout takes the commit from Go's own build info; "dev" / "unknown" when neither is known.
The plugin tells the same about itself when run without CNI_COMMAND
(/opt/cni/bin/portguard prints "portguard VERSION (commit ...): ..." on stderr), and
"portguardctl doctor" reads that line from every plugin binary of the chain.

Exit status: 0, or 2 on a usage error.

Examples:
  portguardctl version
  portguardctl version -o json
`

// cmdVersion prints buildinfo.Get(): "portguardctl v0.1.0 (commit 0123456789ab, go1.26.8)",
// or its JSON object (version, commit, modified, goVersion).
func cmdVersion(args []string, stdout, _ io.Writer) error {
	fs := newFlags("version", versionHelp, stdout)
	output := fs.String("o", "text", "output format: "+formatList(textOrJSON))
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkFormat(*output, textOrJSON); err != nil {
		return err
	}
	info := buildinfo.Get()
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(info)
	}
	_, err := fmt.Fprintf(stdout, "portguardctl %s\n", info)
	return err
}
