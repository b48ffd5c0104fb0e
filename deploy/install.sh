#!/bin/sh
# Installs, verifies, re-asserts and uninstalls portguard in a node's CNI binary directory.
# The DaemonSet (deploy/daemonset.yaml, image from deploy/Dockerfile) runs "install" in its init
# container and "watch" in its long-running container; deploy/uninstall.yaml runs "uninstall";
# `make install`, `make uninstall` and `make verify-install` run it on the machine itself.
#
#   install.sh [install [CNI_BIN_DIR]]   put portguard (and, in drop-in mode, portmap) in place
#   install.sh verify      exit 0 when the directory holds what "install" puts there, else 1
#   install.sh watch       install, then every PORTGUARD_WATCH_INTERVAL seconds put back any
#                          file that stopped being portguard (e.g. a network plugin's installer
#                          copied its own portmap over the drop-in), and say so on stdout
#   install.sh uninstall   remove every file "install" wrote and put the saved portmap back
# Every command takes the CNI binary directory as an optional second argument too.
#
# Environment:
#   CNI_BIN_DIR           the CNI binary directory (default /host/opt/cni/bin, the DaemonSet's
#                         hostPath mount). It must exist: a directory the runtime does not use is
#                         refused rather than created (a plugin there would never run).
#   PORTGUARD_SRC         the binary to install (default /opt/portguard/bin/portguard)
#   PORTGUARD_AS_PORTMAP  "true": also install portguard as "portmap" (drop-in, no conflist
#                         change); the portmap found there is kept as portmap.pre-portguard.
#                         "false" (default): only "portguard"; if an earlier run installed
#                         portguard as "portmap", the saved portmap is put back (rollback).
#   PORTGUARD_WATCH_INTERVAL  seconds between two checks of "watch" (default 30)
#   PORTGUARD_CNI_CONF_DIR    uninstall refuses while a config in this directory (if it exists)
#                         chains "type": "portguard", since every ADD would then fail;
#                         PORTGUARD_FORCE=true overrides.
#   PORTGUARD_TERMINATION_LOG a file that receives the reason of a failure too (the DaemonSet
#                         sets /dev/termination-log, so `kubectl describe pod` shows it)
#
# Files on the host, all in CNI_BIN_DIR: portguard; in drop-in mode portmap, the saved
# portmap.pre-portguard and .portguard-as-portmap.sha256 (the checksum of the portmap that is
# portguard's). Every file is written under a temporary name in the same directory and renamed
# into place, so a runtime executing the plugin at that moment sees the old or the new binary,
# never half of one; uninstall restores portmap with one rename.
set -eu

if [ $# -ge 2 ]; then CNI_BIN_DIR=$2; fi
CNI_BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
SRC=${PORTGUARD_SRC:-/opt/portguard/bin/portguard}
AS_PORTMAP=${PORTGUARD_AS_PORTMAP:-false}
INTERVAL=${PORTGUARD_WATCH_INTERVAL:-30}
CONF_DIR=${PORTGUARD_CNI_CONF_DIR:-}
FORCE=${PORTGUARD_FORCE:-false}
TERMLOG=${PORTGUARD_TERMINATION_LOG:-}
MARK="$CNI_BIN_DIR/.portguard-as-portmap.sha256" # checksum of the portmap we installed
BACKUP="$CNI_BIN_DIR/portmap.pre-portguard"

log() { echo "portguard-install: $*"; }
die() {
	echo "portguard-install: $*" >&2
	if [ -n "$TERMLOG" ]; then echo "portguard-install: $*" >>"$TERMLOG" 2>/dev/null || true; fi
	exit 1
}
sum() { sha256sum "$1" | cut -d' ' -f1; }

# put SRC NAME: atomic copy of SRC to $CNI_BIN_DIR/NAME
put() {
	cp "$1" "$CNI_BIN_DIR/.$2.tmp.$$"
	chmod 0755 "$CNI_BIN_DIR/.$2.tmp.$$"
	mv -f "$CNI_BIN_DIR/.$2.tmp.$$" "$CNI_BIN_DIR/$2"
}

# same FILE: FILE exists and has the content of SRC
same() { [ -f "$1" ] && [ "$(sum "$1")" = "$SRC_SUM" ]; }

# ours: the installed portmap is one this script put there (any portguard version)
ours() { [ -f "$MARK" ] && [ -f "$CNI_BIN_DIR/portmap" ] && [ "$(sum "$CNI_BIN_DIR/portmap")" = "$(cat "$MARK")" ]; }

dropin() {
	case "$AS_PORTMAP" in
	true | 1 | yes) return 0 ;;
	*) return 1 ;;
	esac
}

# about [FILE]: the plugin's own line, "portguard v0.1.0 (commit 0123456789ab, go1.26.8): ...",
# which every CNI plugin prints when run without CNI_COMMAND (upstream: "CNI portmap plugin v1.x")
about() { CNI_COMMAND= "${1:-$SRC}" 2>&1 </dev/null | head -n 1 || true; }

# is_portguard FILE: FILE is some portguard build (another version than SRC included)
is_portguard() { about "$1" | grep -q '^portguard '; }

need_dir() {
	[ -d "$CNI_BIN_DIR" ] || die "$CNI_BIN_DIR does not exist: the container runtime on this node does not read its CNI plugins there, so portguard would never run. Mount the runtime's directory instead (containerd: bin_dir of the cri plugin's cni section; CRI-O: plugin_dirs; k3s: /var/lib/rancher/k3s/data/current/bin) or create it if it really is the one."
}

check_settings() {
	case "$AS_PORTMAP" in
	true | 1 | yes | false | 0 | no | "") ;;
	*) die "PORTGUARD_AS_PORTMAP must be true or false, not \"$AS_PORTMAP\"" ;;
	esac
	case "$INTERVAL" in
	'' | *[!0-9]* | 0) die "PORTGUARD_WATCH_INTERVAL must be a whole number of seconds > 0, not \"$INTERVAL\"" ;;
	esac
	[ -x "$SRC" ] || die "missing $SRC"
	need_dir
	SRC_SUM=$(sum "$SRC")
}

# save_foreign_portmap: keep the portmap that is not portguard's as the one uninstall restores
save_foreign_portmap() {
	if [ -f "$CNI_BIN_DIR/portmap" ] && ! ours && ! same "$CNI_BIN_DIR/portmap" && ! is_portguard "$CNI_BIN_DIR/portmap"; then
		put "$CNI_BIN_DIR/portmap" portmap.pre-portguard
		log "kept the existing portmap ($(sum "$CNI_BIN_DIR/portmap")) as $BACKUP"
	fi
}

put_dropin() {
	put "$SRC" portmap
	echo "$SRC_SUM" >"$MARK.tmp.$$" && mv -f "$MARK.tmp.$$" "$MARK"
}

# restore_portmap: put the saved portmap back with one rename (or remove ours if there was none)
restore_portmap() {
	if ours; then
		if [ -f "$BACKUP" ]; then
			mv -f "$BACKUP" "$CNI_BIN_DIR/portmap"
			log "restored the previous portmap from $BACKUP"
		else
			rm -f "$CNI_BIN_DIR/portmap"
			log "removed portguard's portmap (there was no portmap before it)"
		fi
	elif [ -f "$MARK" ]; then
		# Someone replaced the drop-in since (a network plugin's installer): that portmap is
		# newer than the saved one, so it stays and the saved one goes.
		if [ -f "$BACKUP" ]; then rm -f "$BACKUP"; fi
		log "left $CNI_BIN_DIR/portmap alone: it is no longer portguard's"
	fi
	rm -f "$MARK"
}

do_install() {
	check_settings
	put "$SRC" portguard
	log "installed $CNI_BIN_DIR/portguard: $(about) (sha256 $SRC_SUM)"
	if dropin; then
		save_foreign_portmap
		put_dropin
		log "installed portguard as $CNI_BIN_DIR/portmap (drop-in mode)"
	else
		restore_portmap
		log "mode: separate (conflists must say \"type\": \"portguard\")"
	fi
}

# do_verify prints what is wrong, one line each, and fails when anything is.
do_verify() {
	check_settings
	bad=0
	if ! same "$CNI_BIN_DIR/portguard"; then
		log "NOT OK: $CNI_BIN_DIR/portguard is missing or is not this portguard"
		bad=1
	fi
	if dropin; then
		if ! same "$CNI_BIN_DIR/portmap"; then
			log "NOT OK: $CNI_BIN_DIR/portmap is not portguard (overwritten by another installer?)"
			bad=1
		fi
	elif ours; then
		log "NOT OK: $CNI_BIN_DIR/portmap is still portguard although the mode is separate"
		bad=1
	fi
	if [ "$bad" = 0 ]; then
		mode=separate
		if dropin; then mode=drop-in; fi
		log "OK: $(about) in $CNI_BIN_DIR, mode $mode"
	fi
	return "$bad"
}

# reassert: one pass of watch; prints a line for every file it had to put back.
reassert() {
	need_dir
	if ! same "$CNI_BIN_DIR/portguard"; then
		put "$SRC" portguard
		log "REASSERTED: $CNI_BIN_DIR/portguard was missing or changed; put portguard back"
	fi
	if dropin && ! same "$CNI_BIN_DIR/portmap"; then
		was="missing"
		if [ -f "$CNI_BIN_DIR/portmap" ]; then was="sha256 $(sum "$CNI_BIN_DIR/portmap")"; fi
		save_foreign_portmap
		put_dropin
		log "REASSERTED: $CNI_BIN_DIR/portmap had been replaced ($was); put portguard back (the replacement is kept as $BACKUP for uninstall). Tell the installer that replaced it to leave portmap alone: see docs/install.md"
	fi
}

do_watch() {
	do_install
	# PID 1 in the container: without a trap, TERM would be ignored until the grace period ends.
	trap 'log "stopping"; exit 0' TERM INT
	log "watching $CNI_BIN_DIR every ${INTERVAL}s"
	while :; do
		sleep "$INTERVAL" &
		wait $! || true
		reassert
	done
}

do_uninstall() {
	need_dir
	if [ -n "$CONF_DIR" ] && [ -d "$CONF_DIR" ] && [ "$FORCE" != true ]; then
		users=$(grep -l '"type"[[:space:]]*:[[:space:]]*"portguard"' "$CONF_DIR"/*.conf "$CONF_DIR"/*.conflist "$CONF_DIR"/*.json 2>/dev/null || true)
		if [ -n "$users" ]; then
			die "refusing to uninstall: $(echo "$users" | tr '\n' ' ')chain \"type\": \"portguard\"; every pod ADD would fail without the binary. Switch them back to \"portmap\" first (or set PORTGUARD_FORCE=true)."
		fi
	fi
	restore_portmap
	rm -f "$CNI_BIN_DIR/portguard"
	# temporary files of an install that was killed half-way
	rm -f "$CNI_BIN_DIR"/.portguard.tmp.* "$CNI_BIN_DIR"/.portmap.tmp.* "$CNI_BIN_DIR"/.portmap.pre-portguard.tmp.* "$MARK".tmp.*
	log "uninstalled portguard from $CNI_BIN_DIR"
}

case "${1:-install}" in
install) do_install ;;
verify) do_verify ;;
watch) do_watch ;;
uninstall) do_uninstall ;;
*) die "unknown command \"$1\" (install, verify, watch or uninstall)" ;;
esac
