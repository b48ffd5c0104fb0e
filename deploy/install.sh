#!/bin/sh
# Installs portguard into the node's CNI binary directory. Runs as the init container of
# deploy/daemonset.yaml (image built from deploy/Dockerfile); also usable by hand:
#   CNI_BIN_DIR=/opt/cni/bin PORTGUARD_AS_PORTMAP=true ./install.sh
#
# Environment:
#   CNI_BIN_DIR           target directory (default /host/opt/cni/bin, the DaemonSet's hostPath mount)
#   PORTGUARD_SRC         the binary to install (default /opt/portguard/bin/portguard)
#   PORTGUARD_AS_PORTMAP  "true": also install portguard as "portmap" (drop-in, no conflist change);
#                         the foreign portmap found there is kept as portmap.pre-portguard.
#                         "false" (default): install only "portguard"; if an earlier run installed
#                         portguard as "portmap", put portmap.pre-portguard back (rollback).
#
# Every file is written to a temporary name in the same directory and renamed into place, so a
# runtime executing the plugin at that moment sees either the old or the new binary, never half.
set -eu

CNI_BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
SRC=${PORTGUARD_SRC:-/opt/portguard/bin/portguard}
AS_PORTMAP=${PORTGUARD_AS_PORTMAP:-false}
MARK="$CNI_BIN_DIR/.portguard-as-portmap.sha256"   # checksum of the portmap we installed
BACKUP="$CNI_BIN_DIR/portmap.pre-portguard"

log() { echo "portguard-install: $*"; }
sum() { sha256sum "$1" | cut -d' ' -f1; }

# put SRC NAME: atomic copy of SRC to $CNI_BIN_DIR/NAME
put() {
	cp "$1" "$CNI_BIN_DIR/.$2.tmp.$$"
	chmod 0755 "$CNI_BIN_DIR/.$2.tmp.$$"
	mv -f "$CNI_BIN_DIR/.$2.tmp.$$" "$CNI_BIN_DIR/$2"
}

# ours: the installed portmap is one this script put there
ours() { [ -f "$MARK" ] && [ -f "$CNI_BIN_DIR/portmap" ] && [ "$(sum "$CNI_BIN_DIR/portmap")" = "$(cat "$MARK")" ]; }

case "$AS_PORTMAP" in
true|1|yes|false|0|no|"") ;;
*) log "PORTGUARD_AS_PORTMAP must be true or false, not \"$AS_PORTMAP\""; exit 1 ;;
esac
[ -x "$SRC" ] || { log "missing $SRC"; exit 1; }
mkdir -p "$CNI_BIN_DIR"

put "$SRC" portguard
log "installed $CNI_BIN_DIR/portguard ($(sum "$SRC"))"

case "$AS_PORTMAP" in
true|1|yes)
	if [ -f "$CNI_BIN_DIR/portmap" ] && ! ours; then
		put "$CNI_BIN_DIR/portmap" portmap.pre-portguard
		log "kept the existing portmap as $BACKUP"
	fi
	put "$SRC" portmap
	sum "$SRC" >"$MARK.tmp.$$" && mv -f "$MARK.tmp.$$" "$MARK"
	log "installed portguard as $CNI_BIN_DIR/portmap (drop-in)"
	;;
false|0|no|"")
	if ours; then
		if [ -f "$BACKUP" ]; then
			put "$BACKUP" portmap
			rm -f "$BACKUP"
			log "restored the previous portmap from $BACKUP"
		else
			rm -f "$CNI_BIN_DIR/portmap"
			log "removed portguard's portmap (there was no portmap before it)"
		fi
		rm -f "$MARK"
	fi
	;;
esac
