package main

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/plugins/pkg/testutils"
)

// The plugin's logFile lines (slog JSON) keep the documented keys: event and time (RFC 3339,
// UTC), the event's own object (takeover: from/for/chain/claims; gc: removed/evidence), and
// carry slog's level and msg; a refused ADD is an event too.
func TestLogFileEvents(t *testing.T) {
	withFake(t)
	logFile := filepath.Join(t.TempDir(), "portguard.log")
	conf := func(policy, ip string) []byte {
		s := string(netconf(tcp8080, ip))
		return []byte(strings.Replace(s, `"snat":false`, `"snat":false,"logFile":"`+logFile+`","conflictPolicy":"`+policy+`"`, 1))
	}
	add := func(a *skel.CmdArgs) error {
		_, _, err := testutils.CmdAddWithArgs(a, func() error { return cmdAdd(a) })
		return err
	}
	if err := add(cmdArgs("c1", conf("takeover", "10.88.0.5/16"))); err != nil {
		t.Fatal(err)
	}
	if err := add(cmdArgs("c2", conf("takeover", "10.88.0.6/16"))); err != nil { // c1 has no record: stale
		t.Fatal(err)
	}
	if err := add(cmdArgs("c3", conf("reject", "10.88.0.7/16"))); err == nil {
		t.Fatal("ADD under conflictPolicy reject on a claimed port succeeded")
	}
	gc := cmdArgs("", []byte(`{"cniVersion":"1.1.0","name":"pnet","type":"portguard","logFile":"`+logFile+`",
		"cni.dev/valid-attachments":[]}`))
	if err := cmdGC(gc); err != nil {
		t.Fatal(err)
	}

	f, err := os.Open(logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var events []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var line map[string]json.RawMessage
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("not a JSON line: %q: %v", sc.Text(), err)
		}
		var ev, msg, ts, level string
		json.Unmarshal(line["event"], &ev)
		json.Unmarshal(line["msg"], &msg)
		json.Unmarshal(line["time"], &ts)
		json.Unmarshal(line["level"], &level)
		if tm, err := time.Parse(time.RFC3339Nano, ts); err != nil || !strings.HasSuffix(ts, "Z") || time.Since(tm) > time.Hour {
			t.Errorf("time %q: want RFC 3339 UTC of now (%v)", ts, err)
		}
		if msg != ev || level == "" {
			t.Errorf("line %s: msg %q level %q, want msg = event and a level", sc.Text(), msg, level)
		}
		events = append(events, ev)
		switch ev {
		case "takeover":
			var to struct {
				From   struct{ ContainerID string } `json:"from"`
				For    struct{ ContainerID string } `json:"for"`
				Chain  string                       `json:"chain"`
				Claims []json.RawMessage            `json:"claims"`
			}
			if err := json.Unmarshal(line["takeover"], &to); err != nil || to.From.ContainerID != "c1" || to.For.ContainerID != "c2" || to.Chain == "" || len(to.Claims) != 1 {
				t.Errorf("takeover line %s (%v)", sc.Text(), err)
			}
		case "refused":
			if !strings.Contains(string(line["owner"]), `"c3"`) || !strings.Contains(string(line["error"]), "c2") {
				t.Errorf("refused line %s: want the refused owner c3 and the holder c2", sc.Text())
			}
		case "gc":
			if !strings.Contains(string(line["removed"]), `"c2"`) || line["evidence"] == nil {
				t.Errorf("gc line %s", sc.Text())
			}
		}
	}
	if strings.Join(events, ",") != "takeover,refused,gc" {
		t.Fatalf("events %v, want takeover, refused, gc", events)
	}
}

// The plugin binary links neither gRPC nor Prometheus: the node agent's dependencies stay
// out of the binary every runtime executes on every pod start.
func TestPluginLinksNoAgentDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"google.golang.org/grpc", "github.com/prometheus/", "k8s.io/"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("the plugin imports %s", dep)
			}
		}
	}
}
