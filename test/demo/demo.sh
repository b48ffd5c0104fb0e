#!/usr/bin/env bash
# portguard demo: the stale host-port problem with upstream portmap, the same story with
# portguard, and the repair of a node that upstream portmap left polluted; told on the
# iptables backend and on the nftables backend ("backend": "nftables", upstream's and
# portguard's). DEMO_BACKEND=iptables|nftables|both picks the stories (default both, one
# after the other).
#
# Run as root via `make demo` (which installs the deps and builds bin/portguard first).
# Everything happens in throwaway network namespaces named pgd-<run>-*: the root namespace's
# iptables and nftables are never touched and traffic only goes to addresses inside those
# namespaces.
# Everything the demo creates is removed on exit, also on error or Ctrl-C.
#
# Exit status: 0 when every portguard step behaved as promised, 1 when one did not,
# 2 when the test bed could not be set up.

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GOBIN=${PORTGUARD_UPSTREAM_DIR:-$(go env GOPATH 2>/dev/null)/bin}
PGBIN=${PORTGUARD_BIN_DIR:-$REPO/bin}
NET=pgd-demo                 # CNI network name (appears in the chain comments)
HOSTPORT=8080
TIMEOUT=2                    # seconds for every connection attempt
# Which backend's story to tell: iptables, nftables or both (one after the other).
DEMO_BACKEND=${DEMO_BACKEND:-both}

RUNID=$$
RUN=$(mktemp -d /tmp/pgd-demo.XXXXXX)
NETNSES=()                   # every namespace we created
CACHEFILES=()                # cnitool result cache files we caused
MADE_VAR_LIB_CNI=
[ -e /var/lib/cni ] || MADE_VAR_LIB_CNI=1
FAILURES=()
STEP=0

# ---------------------------------------------------------------- output helpers
if [ -t 1 ]; then B=$'\e[1m'; G=$'\e[32m'; R=$'\e[31m'; Y=$'\e[33m'; N=$'\e[0m'; else B= G= R= Y= N=; fi
part() { printf '\n%s== %s ==%s\n' "$B" "$*" "$N"; }
step() { STEP=$((STEP + 1)); printf '%s%2d.%s %s\n' "$B" "$STEP" "$N" "$*"; }
say()  { printf '    %s\n' "$*"; }
ok()   { printf '    %s✔ %s%s\n' "$G" "$*" "$N"; }
bad()  { printf '    %s✘ %s%s\n' "$R" "$*" "$N"; }
# what upstream does (expected to be wrong; not a failure of the demo)
bug()  { printf '    %s✘ %s%s\n' "$Y" "$*" "$N"; }
indent() { sed 's/^/      /'; }
fail() { bad "$*"; FAILURES+=("step $STEP: $*"); }
die()  { printf '\n%sdemo aborted: %s%s\n' "$R" "$*" "$N" >&2; exit 2; }

# ---------------------------------------------------------------- cleanup
cleanup() {
	local ns pid f
	for ns in "${NETNSES[@]}"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
	done
	for ns in "${NETNSES[@]}"; do ip netns del "$ns" 2>/dev/null; done
	for f in "${CACHEFILES[@]}"; do rm -f "$f"; done
	if [ -n "$MADE_VAR_LIB_CNI" ]; then
		rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null
	fi
	rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- preflight
[ "$(id -u)" = 0 ] || die "run as root (make demo)"
case "$DEMO_BACKEND" in iptables|nftables|both) ;; *) die "DEMO_BACKEND=$DEMO_BACKEND: want iptables, nftables or both" ;; esac
tools="ip iptables socat timeout sha512sum"
[ "$DEMO_BACKEND" = iptables ] || tools="$tools nft"
for c in $tools; do
	command -v "$c" >/dev/null || die "$c not found (make deps installs it)"
done
for b in cnitool bridge host-local portmap; do
	[ -x "$GOBIN/$b" ] || die "$GOBIN/$b missing (make deps installs it)"
done
[ -x "$PGBIN/portguard" ] || die "$PGBIN/portguard missing (make build)"

# CNI_PATH per flavour: upstream portmap, portguard, and portguard installed as "portmap".
mkdir -p "$RUN/bin-upstream" "$RUN/bin-portguard" "$RUN/bin-dropin"
for b in bridge host-local; do
	for d in upstream portguard dropin; do ln -s "$GOBIN/$b" "$RUN/bin-$d/$b"; done
done
ln -s "$GOBIN/portmap" "$RUN/bin-upstream/portmap"
ln -s "$PGBIN/portguard" "$RUN/bin-portguard/portguard"
ln -s "$PGBIN/portguard" "$RUN/bin-dropin/portmap"
export PORTGUARD_LOCK_FILE=$RUN/portguard.lock
export PORTGUARD_STATE_DIR=$RUN/portguard-state   # portguard's attachment records (liveness)

# ---------------------------------------------------------------- test bed
# make_node IDX TYPE EXTRA: node netns pgd-<run>-nodeIDX (192.0.2.1/24 towards the client,
# pods on 10.88.0.0/24 behind bridge cni0) and client netns pgd-<run>-clientIDX (192.0.2.2).
# The conflist chains bridge + host-local and the port-mapping plugin TYPE.
make_node() {
	local i=$1 type=$2 extra=$3 node=pgd-$RUNID-node$1 client=pgd-$RUNID-client$1
	for ns in "$node" "$client"; do
		ip netns add "$ns" || die "ip netns add $ns failed"
		NETNSES+=("$ns")
		ip -n "$ns" link set lo up || die "lo up in $ns"
	done
	ip -n "$node" link add to-client type veth peer name to-node netns "$client" || die "veth"
	ip -n "$node" addr add 192.0.2.1/24 dev to-client && ip -n "$node" link set to-client up &&
		ip -n "$client" addr add 192.0.2.2/24 dev to-node && ip -n "$client" link set to-node up ||
		die "addressing the node/client veth"
	ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1 || die "ip_forward in $node"
	mkdir -p "$RUN/conf$i" "$RUN/ipam$i"
	cat >"$RUN/conf$i/10-demo.conflist" <<EOF
{
  "cniVersion": "1.1.0",
  "name": "$NET",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$RUN/ipam$i",
        "ranges": [[{ "subnet": "10.88.0.0/24" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    {
      "type": "$type",
      "capabilities": { "portMappings": true }$extra
    }
  ]
}
EOF
}

# cni NODEIDX FLAVOUR VERB POD: run cnitool in the node namespace; stdout/stderr to $RUN/POD.VERB.*
cni() {
	local i=$1 flavour=$2 verb=$3 pod=$4
	ip netns exec "pgd-$RUNID-node$i" env \
		CNI_PATH="$RUN/bin-$flavour" NETCONFPATH="$RUN/conf$i" \
		CAP_ARGS="{\"portMappings\":[{\"hostPort\":$HOSTPORT,\"containerPort\":80,\"protocol\":\"tcp\"}]}" \
		"$GOBIN/cnitool" "$verb" "$NET" "/run/netns/pgd-$RUNID-$pod" \
		>"$RUN/$pod.$verb.out" 2>"$RUN/$pod.$verb.err"
}

# container ID cnitool derives from the netns path, and the cache file libcni writes for it
cid_of() { printf 'cnitool-%s' "$(printf '%s' "/run/netns/pgd-$RUNID-$1" | sha512sum | cut -c1-20)"; }

# start_pod NODEIDX FLAVOUR POD NAME: netns + CNI ADD + socat on :80 answering NAME.
# Prints the pod IP into $POD_IP; returns non-zero when the ADD failed.
start_pod() {
	local i=$1 flavour=$2 pod=$3 name=$4 ns=pgd-$RUNID-$3 n
	ip netns add "$ns" || die "ip netns add $ns failed"
	NETNSES+=("$ns")
	ip -n "$ns" link set lo up
	CACHEFILES+=("/var/lib/cni/results/$NET-$(cid_of "$pod")-eth0")
	POD_IP= POD_CID=$(cid_of "$pod")
	cni "$i" "$flavour" add "$pod" || return 1
	POD_IP=$(ip -n "$ns" -4 -o addr show dev eth0 | awk '{sub("/.*","",$4); print $4; exit}')
	ip netns exec "$ns" socat TCP-LISTEN:80,fork,reuseaddr EXEC:"echo $name" >/dev/null 2>&1 &
	for n in $(seq 50); do
		ip netns exec "$ns" ss -Hltn 'sport = :80' | grep -q . && return 0
		sleep 0.1
	done
	die "socat in $ns did not start"
}

# kill_pod POD: the pod dies without a CNI DEL (its processes and its netns go away)
kill_pod() {
	local ns=pgd-$RUNID-$1 pid
	for pid in $(ip netns pids "$ns"); do kill "$pid" 2>/dev/null; done
	ip netns del "$ns"
}

# fetch NETNS ADDR PORT: what answers there (empty when nothing does within $TIMEOUT s)
fetch() {
	ip netns exec "$1" timeout $((TIMEOUT + 1)) \
		socat -u "TCP:$2:$3,connect-timeout=$TIMEOUT" STDOUT 2>/dev/null | head -c 100
}

# nat NODEIDX ARGS...: iptables -t nat in the node namespace
nat() { local i=$1; shift; ip netns exec "pgd-$RUNID-node$i" iptables -t nat "$@"; }
show_dnat() { nat "$1" -nvL CNI-HOSTPORT-DNAT 2>&1 | indent; }
dn_chains() { nat "$1" -S 2>/dev/null | grep -c '^-N CNI-DN-'; }
dn_jumps()  { nat "$1" -S CNI-HOSTPORT-DNAT 2>/dev/null | grep -c -- "-j CNI-DN-"; }

# client_expect NODEIDX WANT: client -> node:8080 must answer WANT (portguard promise)
client_expect() {
	local got
	got=$(fetch "pgd-$RUNID-client$1" 192.0.2.1 "$HOSTPORT")
	if [ "$got" = "$2" ]; then ok "client -> 192.0.2.1:$HOSTPORT answers \"$got\""
	else fail "client -> 192.0.2.1:$HOSTPORT: expected \"$2\", got \"${got:-no answer within ${TIMEOUT}s}\""; fi
}

show_err() { [ -s "$1" ] && indent <"$1"; }

printf '%sportguard demo%s — run %s, scratch dir %s\n' "$B" "$N" "$RUNID" "$RUN"
say "upstream: $GOBIN/{cnitool,bridge,host-local,portmap}   portguard: $PGBIN/portguard"

story_iptables() {
# ================================================================= part 1: upstream
part "Part 1 — upstream portmap v1.10.0: a pod dies without CNI DEL"
make_node 1 portmap ""
step "Node netns pgd-$RUNID-node1 (192.0.2.1, pods on 10.88.0.0/24 via bridge + host-local + portmap);"
say "client netns pgd-$RUNID-client1 (192.0.2.2) reaches the node over a veth."

start_pod 1 upstream podA pod-a || { show_err "$RUN/podA.add.err"; die "upstream ADD of pod A failed"; }
A1_IP=$POD_IP
step "Pod A ($A1_IP, container $POD_CID) added with hostPort $HOSTPORT -> 80; socat there answers \"pod-a\"."
got=$(fetch "pgd-$RUNID-client1" 192.0.2.1 "$HOSTPORT")
[ "$got" = pod-a ] && ok "client -> 192.0.2.1:$HOSTPORT answers \"$got\"" ||
	bug "client -> 192.0.2.1:$HOSTPORT: \"${got:-no answer}\" (expected pod-a; the test bed may be broken)"

step "Pod A dies without a CNI DEL (runtime crash): its processes and netns are gone."
kill_pod podA

start_pod 1 upstream podB pod-b || { show_err "$RUN/podB.add.err"; die "upstream ADD of pod B failed"; }
B1_IP=$POD_IP
step "Pod B ($B1_IP, container $POD_CID) added on the same hostPort $HOSTPORT."

step "iptables -t nat -nvL CNI-HOSTPORT-DNAT on the node:"
show_dnat 1
n=$(dn_chains 1)
[ "$n" -ge 2 ] && bug "$n CNI-DN chains claim tcp/$HOSTPORT; the first jump (pod A's, the dead one) wins" ||
	say "(upstream left $n CNI-DN chain(s); the bug did not reproduce here)"

step "Who answers on the host port?"
got=$(fetch "pgd-$RUNID-client1" 192.0.2.1 "$HOSTPORT")
if [ "$got" = pod-b ]; then say "client -> 192.0.2.1:$HOSTPORT answers \"pod-b\" (the bug did not reproduce)"
else bug "client -> 192.0.2.1:$HOSTPORT: ${got:+\"$got\"}${got:-no answer within ${TIMEOUT}s} — the packet is sent to dead pod A ($A1_IP)"; fi
got=$(fetch "pgd-$RUNID-node1" "$B1_IP" 80)
say "yet pod B is up: node -> $B1_IP:80 answers \"${got:-nothing}\""
if cni 1 upstream check podB; then say "and upstream CHECK of pod B passes: every tool says the pod is fine."
else say "upstream CHECK of pod B failed: $(head -c 200 "$RUN/podB.check.err")"; fi

# ================================================================= part 2: portguard
part "Part 2 — the same story with portguard (conflictPolicy: takeover)"
make_node 2 portguard ",
      \"conflictPolicy\": \"takeover\",
      \"logFile\": \"$RUN/portguard.log\""
step "Fresh node netns pgd-$RUNID-node2 and client pgd-$RUNID-client2, same conflist with \"type\": \"portguard\"."

if start_pod 2 portguard podA2 pod-a; then
	A2_IP=$POD_IP
	step "Pod A ($A2_IP, container $POD_CID) added with hostPort $HOSTPORT -> 80."
	client_expect 2 pod-a
else
	step "Pod A added with hostPort $HOSTPORT -> 80."
	fail "portguard ADD of pod A failed"; show_err "$RUN/podA2.add.err"
fi

step "Pod A dies without a CNI DEL."
kill_pod podA2

if start_pod 2 portguard podB2 pod-b; then
	B2_IP=$POD_IP
	step "Pod B ($B2_IP, container $POD_CID) added on hostPort $HOSTPORT; portguard takes over A's stale claim (logFile):"
	if [ -s "$RUN/portguard.log" ]; then indent <"$RUN/portguard.log"
	else fail "no takeover line in logFile $RUN/portguard.log"; fi
else
	step "Pod B added on hostPort $HOSTPORT."
	fail "portguard ADD of pod B failed"; show_err "$RUN/podB2.add.err"
fi

step "iptables -t nat -nvL CNI-HOSTPORT-DNAT on the node:"
show_dnat 2
n=$(dn_chains 2); j=$(dn_jumps 2)
if [ "$n" = 1 ] && [ "$j" = 1 ]; then ok "one CNI-DN chain, one jump: pod B's"
else fail "expected 1 CNI-DN chain and 1 jump, found $n chain(s) and $j jump(s)"; fi

step "Who answers on the host port?"
client_expect 2 pod-b
if cni 2 portguard check podB2; then ok "portguard CHECK of pod B passes"
else fail "portguard CHECK of pod B failed"; show_err "$RUN/podB2.check.err"; fi

# ================================================================= part 3: repair
part "Part 3 — repair: portguard on the node upstream left polluted (node 1)"
step "Swap the binary: portguard installed as \"portmap\" (make install AS_PORTMAP=1); conflist unchanged."
if cni 1 dropin check podB; then
	fail "portguard CHECK of pod B passed, but pod A's stale claim shadows it"
else
	ok "portguard CHECK of pod B fails and says why:"
	head -c 600 "$RUN/podB.check.err" | indent
fi

step "The operator deletes pod B (CNI DEL, now through portguard): B's chain goes, A's stale one stays."
if cni 1 dropin del podB; then
	kill_pod podB
	n=$(dn_chains 1)
	[ "$n" = 1 ] && ok "DEL of the upstream-made attachment worked; 1 CNI-DN chain left (A's)" ||
		fail "after DEL of pod B expected 1 CNI-DN chain (A's), found $n"
else
	fail "portguard DEL of pod B failed"; show_err "$RUN/podB.del.err"
	kill_pod podB
fi

if start_pod 1 dropin podC pod-c; then
	step "Pod C ($POD_IP, container $POD_CID) added on hostPort $HOSTPORT through portguard; it reports (stderr):"
	if grep -q . "$RUN/podC.add.err"; then head -c 1200 "$RUN/podC.add.err" | indent
	else fail "portguard reported no takeover on stderr"; fi
else
	step "Pod C added on hostPort $HOSTPORT through portguard."
	fail "portguard ADD of pod C failed"; show_err "$RUN/podC.add.err"
fi

step "iptables -t nat -nvL CNI-HOSTPORT-DNAT on the node:"
show_dnat 1
n=$(dn_chains 1); j=$(dn_jumps 1)
if [ "$n" = 1 ] && [ "$j" = 1 ]; then ok "one CNI-DN chain, one jump: pod C's (A's stale claim is gone)"
else fail "expected 1 CNI-DN chain and 1 jump, found $n chain(s) and $j jump(s)"; fi

step "Who answers on the host port?"
client_expect 1 pod-c
if cni 1 dropin check podC; then ok "portguard CHECK of pod C passes"
else fail "portguard CHECK of pod C failed"; show_err "$RUN/podC.check.err"; fi
}

# ---------------------------------------------------------------- nftables helpers
# nftn NODEIDX ARGS...: nft in the node namespace
nftn() { local i=$1; shift; ip netns exec "pgd-$RUNID-node$i" nft "$@"; }
# upstream's nftables backend: one rule per mapping in chain hostports of table ip cni_hostport
show_up_nft() { nftn "$1" list chain ip cni_hostport hostports 2>&1 | indent; }
up_claims()   { nftn "$1" list chain ip cni_hostport hostports 2>/dev/null | grep -c "dport $HOSTPORT "; }
# portguard's: one element per claim in map any4 of table inet portguard, commented with its owner
show_pg_nft() { nftn "$1" list map inet portguard any4 2>&1 | indent; }
pg_claims()   { nftn "$1" list map inet portguard any4 2>/dev/null | grep -c "\. $HOSTPORT comment"; }
pg_claim_of() { nftn "$1" list map inet portguard any4 2>/dev/null | grep -c "\. $HOSTPORT comment \"$NET/$2\""; }

story_nftables() {
# ================================================================= part 1n: upstream, nftables
part "Part 1 — upstream portmap v1.10.0 with \"backend\": \"nftables\": a pod dies without CNI DEL"
make_node 3 portmap ",
      \"backend\": \"nftables\""
step "Node netns pgd-$RUNID-node3 (192.0.2.1, pods on 10.88.0.0/24), conflist bridge + host-local + portmap with \"backend\": \"nftables\";"
say "client netns pgd-$RUNID-client3 (192.0.2.2)."

start_pod 3 upstream podA3 pod-a || { show_err "$RUN/podA3.add.err"; die "upstream ADD of pod A failed"; }
A3_IP=$POD_IP
step "Pod A ($A3_IP, container $POD_CID) added with hostPort $HOSTPORT -> 80."
got=$(fetch "pgd-$RUNID-client3" 192.0.2.1 "$HOSTPORT")
[ "$got" = pod-a ] && ok "client -> 192.0.2.1:$HOSTPORT answers \"$got\"" ||
	bug "client -> 192.0.2.1:$HOSTPORT: \"${got:-no answer}\" (expected pod-a; the test bed may be broken)"

step "Pod A dies without a CNI DEL."
kill_pod podA3

start_pod 3 upstream podB3 pod-b || { show_err "$RUN/podB3.add.err"; die "upstream ADD of pod B failed"; }
B3_IP=$POD_IP
step "Pod B ($B3_IP, container $POD_CID) added on the same hostPort $HOSTPORT."

step "nft list chain ip cni_hostport hostports on the node:"
show_up_nft 3
n=$(up_claims 3)
[ "$n" -ge 2 ] && bug "$n rules claim tcp/$HOSTPORT; the first (pod A's, the dead one) wins" ||
	say "(upstream left $n rule(s) for tcp/$HOSTPORT; the bug did not reproduce here)"

step "Who answers on the host port?"
got=$(fetch "pgd-$RUNID-client3" 192.0.2.1 "$HOSTPORT")
if [ "$got" = pod-b ]; then say "client -> 192.0.2.1:$HOSTPORT answers \"pod-b\" (the bug did not reproduce)"
else bug "client -> 192.0.2.1:$HOSTPORT: ${got:+\"$got\"}${got:-no answer within ${TIMEOUT}s} — the packet is sent to dead pod A ($A3_IP)"; fi
got=$(fetch "pgd-$RUNID-node3" "$B3_IP" 80)
say "yet pod B is up: node -> $B3_IP:80 answers \"${got:-nothing}\""
if cni 3 upstream check podB3; then say "and upstream CHECK of pod B passes: every tool says the pod is fine."
else say "upstream CHECK of pod B failed: $(head -c 200 "$RUN/podB3.check.err")"; fi

# ================================================================= part 2n: portguard, nftables
part "Part 2 — the same story with portguard, \"backend\": \"nftables\" (conflictPolicy: takeover)"
make_node 4 portguard ",
      \"backend\": \"nftables\",
      \"conflictPolicy\": \"takeover\",
      \"logFile\": \"$RUN/portguard-nft.log\""
step "Fresh node netns pgd-$RUNID-node4 and client pgd-$RUNID-client4, same conflist with \"type\": \"portguard\", \"backend\": \"nftables\"."

if start_pod 4 portguard podA4 pod-a; then
	A4_IP=$POD_IP A4_CID=$POD_CID
	step "Pod A ($A4_IP, container $POD_CID) added with hostPort $HOSTPORT -> 80."
	client_expect 4 pod-a
else
	step "Pod A added with hostPort $HOSTPORT -> 80."
	fail "portguard ADD of pod A failed"; show_err "$RUN/podA4.add.err"
fi

step "Pod A dies without a CNI DEL."
kill_pod podA4

if start_pod 4 portguard podB4 pod-b; then
	B4_IP=$POD_IP B4_CID=$POD_CID
	step "Pod B ($B4_IP, container $POD_CID) added on hostPort $HOSTPORT; portguard takes over A's stale claim in the same batch (logFile):"
	if [ -s "$RUN/portguard-nft.log" ]; then indent <"$RUN/portguard-nft.log"
	else fail "no takeover line in logFile $RUN/portguard-nft.log"; fi
else
	step "Pod B added on hostPort $HOSTPORT."
	fail "portguard ADD of pod B failed"; show_err "$RUN/podB4.add.err"
fi

step "nft list map inet portguard any4 on the node (a claim is one element; the kernel keeps keys unique):"
show_pg_nft 4
n=$(pg_claims 4); m=$(pg_claim_of 4 "${B4_CID:-none}")
if [ "$n" = 1 ] && [ "$m" = 1 ]; then ok "one element claims tcp/$HOSTPORT: pod B's"
else fail "expected 1 element for tcp/$HOSTPORT, pod B's; found $n, $m of them pod B's"; fi

step "Who answers on the host port?"
client_expect 4 pod-b
if cni 4 portguard check podB4; then ok "portguard CHECK of pod B passes"
else fail "portguard CHECK of pod B failed"; show_err "$RUN/podB4.check.err"; fi

# ================================================================= part 3n: repair, nftables
part "Part 3 — repair: portguard (\"backend\": \"nftables\") on the node upstream's nftables backend left polluted (node 3)"
step "Swap the binary: portguard installed as \"portmap\"; conflist unchanged (\"backend\": \"nftables\")."
if cni 3 dropin check podB3; then
	fail "portguard CHECK of pod B passed, but pod A's stale upstream rule shadows it"
else
	ok "portguard CHECK of pod B fails and says why:"
	head -c 600 "$RUN/podB3.check.err" | indent
fi

step "The operator deletes pod B (CNI DEL, now through portguard): B's upstream rule goes, A's stale one stays."
if cni 3 dropin del podB3; then
	kill_pod podB3
	n=$(up_claims 3)
	[ "$n" = 1 ] && ok "DEL of the upstream-made attachment worked; 1 upstream rule left for tcp/$HOSTPORT (A's)" ||
		fail "after DEL of pod B expected 1 upstream rule (A's), found $n"
else
	fail "portguard DEL of pod B failed"; show_err "$RUN/podB3.del.err"
	kill_pod podB3
fi

if start_pod 3 dropin podC3 pod-c; then
	C3_CID=$POD_CID
	step "Pod C ($POD_IP, container $POD_CID) added on hostPort $HOSTPORT through portguard; it takes over A's upstream rule in the same batch (stderr):"
	if grep -q . "$RUN/podC3.add.err"; then head -c 1200 "$RUN/podC3.add.err" | indent
	else fail "portguard reported no takeover on stderr"; fi
else
	step "Pod C added on hostPort $HOSTPORT through portguard."
	fail "portguard ADD of pod C failed"; show_err "$RUN/podC3.add.err"
fi

step "nft list chain ip cni_hostport hostports and nft list map inet portguard any4 on the node:"
show_up_nft 3
show_pg_nft 3
n=$(up_claims 3); m=$(pg_claim_of 3 "${C3_CID:-none}")
if [ "$n" = 0 ] && [ "$m" = 1 ]; then ok "no upstream rule left for tcp/$HOSTPORT; one element, pod C's"
else fail "expected no upstream rule and pod C's element, found $n upstream rule(s) and $m element(s) of pod C"; fi

step "Who answers on the host port?"
client_expect 3 pod-c
if cni 3 dropin check podC3; then ok "portguard CHECK of pod C passes"
else fail "portguard CHECK of pod C failed"; show_err "$RUN/podC3.check.err"; fi
}

# ================================================================= run
case "$DEMO_BACKEND" in
iptables) story_iptables ;;
nftables) story_nftables ;;
both)
	printf '\n%s######## iptables backend ########%s\n' "$B" "$N"
	story_iptables
	printf '\n%s######## nftables backend ########%s\n' "$B" "$N"
	story_nftables ;;
esac

# ================================================================= verdict
echo
if [ ${#FAILURES[@]} -eq 0 ]; then
	printf '%sRESULT: portguard behaved as promised.%s Cleaning up (namespaces, socat, %s).\n' "$G" "$N" "$RUN"
	exit 0
fi
printf '%sRESULT: %d portguard step(s) did not behave as promised:%s\n' "$R" ${#FAILURES[@]} "$N"
printf '  - %s\n' "${FAILURES[@]}"
exit 1
