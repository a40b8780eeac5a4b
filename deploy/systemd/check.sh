#!/usr/bin/env bash
# Checks deploy/systemd/ offline, without systemd as PID 1:
#   - portcullis.toml passes `portcullis config check`;
#   - portcullis.service, alone and with the serial.conf drop-in, passes
#     `systemd-analyze verify`;
#   - both are rated at most 2.0 ("OK") by `systemd-analyze security --offline=yes`;
#   - the system calls BINARY makes (traced by strace while it starts, takes a
#     device's certificate login and a publish over TLS, a CLI request on its admin
#     socket, a SIGHUP reload and a SIGTERM stop) are all in the unit's
#     SystemCallFilter (@system-service, less @privileged), and it maps no memory
#     writable and executable. No systemd as PID 1 is needed for any of it; the
#     unit itself is not started, so its other settings are not tried at run time.
#
# Usage: deploy/systemd/check.sh BINARY   (e.g. target/release/portcullis)
# Needs systemd-analyze, strace and mosquitto_pub (Debian: apt-get install systemd
# strace mosquitto-clients).
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
for tool in systemd-analyze strace mosquitto_pub; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install systemd strace mosquitto-clients)"
done

work=$(mktemp -d)
gateway_pid=""
cleanup() {
    if [ -n "$gateway_pid" ]; then kill "$gateway_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

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
# The filter the unit sets, as the system calls it allows.
if ! grep -qxF 'SystemCallFilter=@system-service' "$here/portcullis.service" \
    || ! grep -qxF 'SystemCallFilter=~@privileged' "$here/portcullis.service"; then
    die "portcullis.service: SystemCallFilter= is not @system-service less @privileged; update this check"
fi
calls_in() {
    systemd-analyze syscall-filter "$1" | awk 'NR > 1 && NF && $1 !~ /^#/ {print $1}' \
        | while read -r item; do
            case $item in @*) calls_in "$item" ;; *) echo "$item" ;; esac
        done
}
calls_in @system-service | sort -u >"$work/allowed"
calls_in @privileged | sort -u >"$work/privileged"
[ -s "$work/allowed" ] && [ -s "$work/privileged" ] || die "systemd-analyze syscall-filter listed nothing"

echo "== the gateway's system calls against the unit's filter"
run="$work/run"
mkdir -p "$run"
printf '%s\n' "data_dir = \"$run/data\"" '[listeners]' 'device_tls = "127.0.0.1:0"' \
    'device_plain = "off"' 'service_tls = "127.0.0.1:0"' 'coap_dtls = "127.0.0.1:0"' \
    '[observability]' 'listen = "127.0.0.1:0"' '[auth]' \
    "secret_key_file = \"$run/keys/secret-hash.key\"" "master_key_file = \"$run/keys/master.key\"" \
    '[audit]' "key_file = \"$run/keys/audit.key\"" >"$run/gateway.toml"
strace -f -qq -o "$work/trace" "$binary" serve --config "$run/gateway.toml" >"$work/serve.out" 2>&1 &
strace_pid=$!
port=""
for _ in $(seq 1 100); do
    port=$(sed -n 's/.*device listener (MQTT over TLS): 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/serve.out")
    [ -n "$port" ] && grep -q 'observability' "$work/serve.out" && break
    kill -0 "$strace_pid" 2>/dev/null || { cat "$work/serve.out" >&2; die "the gateway did not start"; }
    sleep 0.2
done
[ -n "$port" ] || { cat "$work/serve.out" >&2; die "the gateway did not say where it listens"; }
# strace runs the gateway as its child.
gateway_pid=$(pgrep -P "$strace_pid" -x portcullis || true)
[ -n "$gateway_pid" ] || die "no gateway process under strace"
"$binary" pki issue sensor-1 --config "$run/gateway.toml" >/dev/null
"$binary" device add sensor-1 --cert-any --config "$run/gateway.toml" >/dev/null
pki="$run/data/pki"
mosquitto_pub -h localhost -p "$port" --cafile "$pki/ca.pem" --cert "$pki/clients/sensor-1.pem" \
    --key "$pki/clients/sensor-1.key" -i sensor-1 -q 1 -t devices/sensor-1/telemetry -m '{"t":1}' \
    || die "the traced gateway refused the device's publish"
kill -HUP "$gateway_pid"
for _ in $(seq 1 100); do
    grep -q 'configuration reloaded' "$work/serve.out" && break
    sleep 0.1
done
grep -q 'configuration reloaded' "$work/serve.out" || { cat "$work/serve.out" >&2; die "SIGHUP did not reload"; }
kill -TERM "$gateway_pid"
wait "$strace_pid" || die "the traced gateway did not exit 0 on SIGTERM"
gateway_pid=""
grep -qx 'portcullis stopped' "$work/serve.out" || die "no 'portcullis stopped'"
# Lines read "PID name(args) = result"; "PID <... name resumed>" lines are skipped.
awk '{ call = $2; sub(/\(.*/, "", call); print call }' "$work/trace" \
    | grep -E '^[a-z_][a-z0-9_]*$' | sort -u >"$work/used"
echo "$(wc -l <"$work/used") distinct system calls: $(tr '\n' ' ' <"$work/used")"
outside=$(comm -23 "$work/used" "$work/allowed" | tr '\n' ' ')
[ -z "$outside" ] || die "the gateway made system calls outside @system-service: $outside"
denied=$(comm -12 "$work/used" "$work/privileged" | tr '\n' ' ')
[ -z "$denied" ] || die "the gateway made system calls in @privileged: $denied"
if grep -E 'PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE|mprotect\(.*PROT_EXEC' "$work/trace" >&2; then
    die "writable and executable memory (MemoryDenyWriteExecute=yes would refuse it)"
fi
echo "deploy/systemd: ok"
