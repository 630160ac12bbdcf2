#!/bin/sh
# Install (or, with --uninstall, remove) dispatch-mcp: binaries, systemd units, sysusers.d and
# tmpfiles.d entries, an example configuration and allowlist, and the docs.
#
#   cargo build --release && sudo systemd/install.sh
#   sudo systemd/install.sh --uninstall
#
# Environment:
#   DESTDIR     stage into this directory instead of / (nothing is started or reloaded then)
#   PREFIX      /usr/local      binaries in $PREFIX/bin, docs in $PREFIX/share/doc/dispatch-mcp
#   SYSCONFDIR  /etc            config in $SYSCONFDIR/dispatch-mcp
#   UNITDIR     /etc/systemd/system
#   BIN_SRC     target/release  where the built binaries are
#   DISPATCH_INSTALL_NO_ACTIVATE=1  never run systemd-sysusers/tmpfiles/systemctl
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BIN_SRC=${BIN_SRC:-$top/target/release}
bindir=$PREFIX/bin
docdir=$PREFIX/share/doc/dispatch-mcp
confdir=$SYSCONFDIR/dispatch-mcp
live=false
# Touch the running system only for a real install on a machine booted with systemd.
[ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && [ -z "${DISPATCH_INSTALL_NO_ACTIVATE:-}" ] && live=true

say() { printf '%s\n' "$*"; }

if [ "${1:-}" = "--uninstall" ]; then
    if $live; then
        systemctl disable --now dispatch-helper.socket dispatch-helper.service 2>/dev/null || true
    fi
    rm -f "$DESTDIR$bindir/dispatch-helper" "$DESTDIR$bindir/dispatch-mcp" "$DESTDIR$bindir/dispatch-demo-lane"
    rm -f "$DESTDIR$UNITDIR/dispatch-helper.service" "$DESTDIR$UNITDIR/dispatch-helper.socket"
    rm -f "$DESTDIR$SYSCONFDIR/sysusers.d/dispatch-mcp.conf" "$DESTDIR$SYSCONFDIR/tmpfiles.d/dispatch-mcp.conf"
    rm -rf "$DESTDIR$docdir"
    $live && systemctl daemon-reload
    say "removed binaries, units, sysusers/tmpfiles entries and docs."
    say "kept: $confdir (configuration), /var/lib/dispatch-mcp (job records, lane work dirs),"
    say "      /var/log/dispatch-mcp (the audit log) and the 'dispatch' group. Remove them by hand if wanted."
    exit 0
fi

for binary in dispatch-helper dispatch-mcp dispatch-demo-lane; do
    if [ ! -x "$BIN_SRC/$binary" ]; then
        say "install.sh: $BIN_SRC/$binary is missing; build first: cargo build --release (or set BIN_SRC)" >&2
        exit 1
    fi
done

install -d -m 0755 "$DESTDIR$bindir" "$DESTDIR$UNITDIR" "$DESTDIR$docdir" \
    "$DESTDIR$SYSCONFDIR/sysusers.d" "$DESTDIR$SYSCONFDIR/tmpfiles.d"
# The configuration and allowlist are root's alone: lanes (and local users) must not read
# which org-users, unix users and repos exist, or how the helper is set up.
install -d -m 0700 "$DESTDIR$confdir"
for binary in dispatch-helper dispatch-mcp dispatch-demo-lane; do
    install -m 0755 "$BIN_SRC/$binary" "$DESTDIR$bindir/$binary"
done
# The units name /usr/local/bin and /etc/dispatch-mcp; follow PREFIX and SYSCONFDIR.
for unit in dispatch-helper.service dispatch-helper.socket; do
    sed -e "s|/usr/local/bin/|$bindir/|g" -e "s|/etc/dispatch-mcp/|$confdir/|g" \
        -e "s|/usr/local/share/doc/dispatch-mcp/|$docdir/|g" \
        "$here/$unit" > "$DESTDIR$UNITDIR/$unit"
    chmod 0644 "$DESTDIR$UNITDIR/$unit"
done
install -m 0644 "$here/sysusers.conf" "$DESTDIR$SYSCONFDIR/sysusers.d/dispatch-mcp.conf"
install -m 0644 "$here/tmpfiles.conf" "$DESTDIR$SYSCONFDIR/tmpfiles.d/dispatch-mcp.conf"
# Never overwrite an administrator's configuration.
for file in helper.toml repos.json; do
    if [ -e "$DESTDIR$confdir/$file" ]; then
        # Kept, but made root's alone as a fresh install would (earlier versions used 0644).
        chmod 0600 "$DESTDIR$confdir/$file"
        say "kept existing $confdir/$file"
    else
        sed -e "s|/etc/dispatch-mcp/|$confdir/|g" "$here/$file" > "$DESTDIR$confdir/$file"
        chmod 0600 "$DESTDIR$confdir/$file"
    fi
done
install -m 0644 "$top/SECURITY.md" "$top/README.md" "$DESTDIR$docdir/"

if $live; then
    systemd-sysusers "$SYSCONFDIR/sysusers.d/dispatch-mcp.conf"
    systemd-tmpfiles --create "$SYSCONFDIR/tmpfiles.d/dispatch-mcp.conf"
    systemctl daemon-reload
    say "installed. Next:"
    say "  1. edit $confdir/repos.json (lanes) and $confdir/helper.toml, then: dispatch-helper check"
    say "  2. create each lane user's work dir (see $SYSCONFDIR/tmpfiles.d/dispatch-mcp.conf)"
    say "  3. add MCP users to the group: usermod -aG dispatch USER"
    say "  4. systemctl enable --now dispatch-helper.socket"
else
    say "installed into ${DESTDIR:-/} under $PREFIX; systemd was not touched (DESTDIR set, or not booted with systemd)."
fi
