#!/usr/bin/env bash
# Checks deploy/systemd/ offline, without systemd as PID 1:
#   - portcullis.toml passes `portcullis config check`;
#   - portcullis.service, alone and with the serial.conf drop-in, passes
#     `systemd-analyze verify`;
#   - both are rated at most 2.0 ("OK") by `systemd-analyze security --offline=yes`.
#
# Usage: deploy/systemd/check.sh BINARY   (e.g. target/release/portcullis)
# Needs systemd-analyze (Debian: apt-get install systemd).
#
# `verify` checks that ExecStart= names an executable file, so the unit is copied to
# a temporary directory with /usr/local/bin/portcullis replaced by BINARY; nothing
# else in it changes. The drop-in is found there the way systemd finds it, through
# SYSTEMD_UNIT_PATH.
set -euo pipefail

# systemd 252 takes the threshold in tenths: 20 is an exposure of 2.0.
THRESHOLD_TENTHS=20

die() { echo "deploy/systemd/check.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 BINARY"
binary=$(realpath -e "$1") || die "$1: no such file"
[ -x "$binary" ] || die "$binary: not executable"
here=$(cd "$(dirname "$0")" && pwd)
command -v systemd-analyze >/dev/null || die "systemd-analyze not found (apt-get install systemd)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$binary" config check "$here/portcullis.toml" || die "portcullis.toml: config check failed"

# The unit as shipped, with ExecStart pointing at BINARY.
grep -q '^ExecStart=/usr/local/bin/portcullis serve ' "$here/portcullis.service" \
    || die "portcullis.service: ExecStart= no longer starts /usr/local/bin/portcullis serve"
mkdir -p "$work/plain" "$work/serial/portcullis.service.d"
sed "s#^ExecStart=/usr/local/bin/portcullis #ExecStart=$binary #" \
    "$here/portcullis.service" >"$work/plain/portcullis.service"
cp "$work/plain/portcullis.service" "$work/serial/portcullis.service"
cp "$here/serial.conf" "$work/serial/portcullis.service.d/serial.conf"

# Settings the documentation promises; a unit that lost one fails here, even if its
# score would still pass. (Single quotes: $MAINPID is the unit's, not ours.)
# shellcheck disable=SC2016
for line in 'User=portcullis' 'StateDirectory=portcullis' 'ConfigurationDirectory=portcullis' \
    'LoadCredential=server.key:/etc/portcullis/credentials/server.key' \
    'ExecReload=/bin/kill -HUP $MAINPID' 'Restart=on-failure' 'ProtectSystem=strict' \
    'PrivateDevices=yes' 'NoNewPrivileges=yes' 'CapabilityBoundingSet=' 'UMask=0077'; do
    grep -qxF "$line" "$here/portcullis.service" || die "portcullis.service: missing '$line'"
done
# The config points at the paths the unit provides.
grep -qxF 'key = "/run/credentials/portcullis.service/server.key"' "$here/portcullis.toml" \
    || die "portcullis.toml: [tls] key is not the unit's credential"
grep -qxF 'data_dir = "/var/lib/portcullis/data"' "$here/portcullis.toml" \
    || die "portcullis.toml: data_dir is not under the unit's StateDirectory"

for variant in plain serial; do
    unit="$work/$variant/portcullis.service"
    echo "== $variant: systemd-analyze verify"
    # verify reports problems on stderr and may still exit 0 for some of them.
    SYSTEMD_UNIT_PATH="$work/$variant:" systemd-analyze verify "$unit" 2>"$work/verify.err" \
        || { cat "$work/verify.err" >&2; die "$variant: systemd-analyze verify failed"; }
    if [ -s "$work/verify.err" ]; then
        cat "$work/verify.err" >&2
        die "$variant: systemd-analyze verify reported problems"
    fi
    echo "== $variant: systemd-analyze security --offline=yes --threshold=$THRESHOLD_TENTHS"
    status=0
    SYSTEMD_UNIT_PATH="$work/$variant:" systemd-analyze security --offline=yes \
        --threshold="$THRESHOLD_TENTHS" "$unit" >"$work/security.out" 2>&1 || status=$?
    # Read the figure too, so the log says it and a tool that ignores the
    # threshold cannot pass a worse unit.
    level=$(sed -n 's/.*Overall exposure level for portcullis.service: \([0-9.]*\).*/\1/p' \
        "$work/security.out")
    if [ -z "$level" ]; then
        cat "$work/security.out" >&2
        die "$variant: no 'Overall exposure level' in systemd-analyze security's output"
    fi
    tenths=$(awk -v l="$level" 'BEGIN { printf "%d", l * 10 + 0.5 }')
    echo "$variant: overall exposure level $level (at most 2.0)"
    if [ "$status" -ne 0 ] || [ "$tenths" -gt "$THRESHOLD_TENTHS" ]; then
        grep -E '^✗' "$work/security.out" >&2 || true
        die "$variant: exposure $level is over 2.0 (exit $status)"
    fi
done
echo "deploy/systemd: ok"
