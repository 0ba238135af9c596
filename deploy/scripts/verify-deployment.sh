#!/usr/bin/env bash
# Check that a minivllm server answers: liveness, readiness, metrics and chat latency.
#
#   verify-deployment.sh RELEASE NAMESPACE TIMEOUT_S   a Helm release: its pods Running and Ready,
#                                                       then the checks through kubectl port-forward
#   verify-deployment.sh URL [TIMEOUT_S]               any running server, e.g. http://127.0.0.1:8000
#
# Checks, in order: (release) every pod of the release Running and Ready within TIMEOUT_S;
# GET /health and GET /ready 200 (polled until TIMEOUT_S; URL mode default 60); GET /metrics 200;
# GET /v1/models names a model; VERIFY_REQUESTS (20) POST /v1/chat/completions all 200, with a p95
# latency <= VERIFY_P95_S (3) seconds.
# Success: one "verify-deployment: OK ..." line on stdout, exit 0. Failure: one
# "verify-deployment: FAIL: ..." line on stderr, exit 1 (2 for bad usage).
# Env: MINIVLLM_API_KEY (sent as a Bearer token), VERIFY_MODEL (default: the first of /v1/models),
# VERIFY_MAX_TOKENS (8), VERIFY_REQUEST_TIMEOUT_S (60), VERIFY_HTTP=python (Python's urllib instead
# of curl; used anyway where curl is missing), KUBECTL (kubectl).
set -euo pipefail

fail() {
    echo "verify-deployment: FAIL: $*" >&2
    exit 1
}

usage() {
    echo "usage: verify-deployment.sh RELEASE NAMESPACE TIMEOUT_S | verify-deployment.sh URL [TIMEOUT_S]" >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

requests=${VERIFY_REQUESTS:-20}
p95_limit=${VERIFY_P95_S:-3}
max_tokens=${VERIFY_MAX_TOKENS:-8}
request_timeout=${VERIFY_REQUEST_TIMEOUT_S:-60}
kubectl=${KUBECTL:-kubectl}
client=${VERIFY_HTTP:-curl}
command -v curl >/dev/null 2>&1 || client=python
is_uint "$requests" && [ "$requests" -ge 1 ] || usage

tmp=$(mktemp -d)
forward_pid=""
cleanup() {
    if [ -n "$forward_pid" ]; then kill "$forward_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

if [ -n "${MINIVLLM_API_KEY:-}" ]; then
    (umask 077 && printf 'Authorization: Bearer %s\n' "$MINIVLLM_API_KEY" >"$tmp/auth")
fi

# http METHOD URL [JSON]: sets $status (000: no answer) and $seconds; the body is in $tmp/body,
# the transport error (if any) in $tmp/err.
http() {
    local method=$1 url=$2 data=${3:-} out
    : >"$tmp/body"
    if [ "$client" = curl ]; then
        local args=(-sS -o "$tmp/body" -w '%{http_code} %{time_total}' -X "$method" --max-time "$request_timeout")
        if [ -f "$tmp/auth" ]; then args+=(-H "@$tmp/auth"); fi
        if [ -n "$data" ]; then args+=(-H 'Content-Type: application/json' --data-binary "$data"); fi
        out=$(curl "${args[@]}" "$url" 2>"$tmp/err") || true
    else
        out=$(python3 - "$method" "$url" "$data" "$request_timeout" "$tmp/body" 2>"$tmp/err" <<'PY'
import os, sys, time, urllib.error, urllib.request
method, url, data, timeout, body_path = sys.argv[1:]
headers = {"Content-Type": "application/json"} if data else {}
if os.environ.get("MINIVLLM_API_KEY"):
    headers["Authorization"] = "Bearer " + os.environ["MINIVLLM_API_KEY"]
request = urllib.request.Request(url, data=data.encode() if data else None, method=method, headers=headers)
start = time.monotonic()
try:
    with urllib.request.urlopen(request, timeout=float(timeout)) as response:
        status, body = response.status, response.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
except Exception as e:  # no answer: curl's 000
    print(f"{type(e).__name__}: {getattr(e, 'reason', e)}", file=sys.stderr)
    status, body = 0, b""
with open(body_path, "wb") as f:
    f.write(body)
print(f"{status:03d} {time.monotonic() - start:.6f}")
PY
        ) || true
    fi
    read -r status seconds <<<"${out:-000 0}"
}

transport_error() {
    tr '\n' ' ' <"$tmp/err" | sed 's/ *$//'
}

# wait_for PATH DEADLINE: poll until PATH answers 200, or fail saying what it answered last.
wait_for() {
    local path=$1 deadline=$2
    while :; do
        http GET "$base$path"
        [ "$status" = 200 ] && return 0
        if [ "$(date +%s)" -ge "$deadline" ]; then
            if [ "$status" = 000 ]; then
                fail "GET $path: no answer from $base within ${timeout}s ($(transport_error))"
            fi
            fail "GET $path answered $status, not 200, at $base within ${timeout}s"
        fi
        sleep 1
    done
}

# ---- arguments ----------------------------------------------------------------------------------
case "${1:-}" in
    http://* | https://*)
        [ $# -le 2 ] || usage
        base=${1%/}
        timeout=${2:-60}
        release=""
        ;;
    "" | -h | --help)
        usage
        ;;
    *)
        [ $# -eq 3 ] || usage
        release=$1
        namespace=$2
        timeout=$3
        ;;
esac
is_uint "$timeout" || usage
deadline=$(($(date +%s) + timeout))

# ---- a Helm release: pods, then a port-forward to its Service -------------------------------------
if [ -n "$release" ]; then
    command -v "$kubectl" >/dev/null 2>&1 || fail "kubectl not found (set KUBECTL)"
    selector="app.kubernetes.io/instance=$release"
    while :; do
        if ! "$kubectl" get pods -n "$namespace" -l "$selector" -o \
            'jsonpath={range .items[*]}{.metadata.name}{"\t"}{.status.phase}{"\t"}{.status.conditions[?(@.type=="Ready")].status}{"\t"}{.metadata.deletionTimestamp}{"\n"}{end}' \
            >"$tmp/pods" 2>"$tmp/err"; then
            fail "kubectl get pods -n $namespace -l $selector: $(transport_error)"
        fi
        # pods being deleted (a rollout's old ones) do not count
        pending=$(awk -F'\t' '$1 != "" && $4 == "" && !($2 == "Running" && $3 == "True") {
            print $1 " is " $2 (($3 == "True") ? "" : ", not Ready"); exit }' "$tmp/pods")
        live=$(awk -F'\t' '$1 != "" && $4 == ""' "$tmp/pods" | wc -l)
        if [ "$live" -ge 1 ] && [ -z "$pending" ]; then break; fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            [ "$live" -ge 1 ] || fail "no pods of release $release in namespace $namespace after ${timeout}s"
            fail "pod $pending after ${timeout}s (namespace $namespace)"
        fi
        sleep 2
    done
    service=$("$kubectl" get svc -n "$namespace" -l "$selector" -o 'jsonpath={.items[0].metadata.name}' 2>"$tmp/err") ||
        fail "kubectl get svc -n $namespace -l $selector: $(transport_error)"
    [ -n "$service" ] || fail "no Service of release $release in namespace $namespace"
    port=$("$kubectl" get svc -n "$namespace" "$service" -o 'jsonpath={.spec.ports[?(@.name=="http")].port}' 2>/dev/null || true)
    "$kubectl" port-forward -n "$namespace" "svc/$service" ":${port:-8000}" >"$tmp/forward" 2>&1 &
    forward_pid=$!
    local_port=""
    for _ in $(seq 1 60); do
        local_port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$tmp/forward" | head -n 1)
        [ -n "$local_port" ] && break
        kill -0 "$forward_pid" 2>/dev/null || fail "kubectl port-forward svc/$service: $(tr '\n' ' ' <"$tmp/forward")"
        sleep 0.25
    done
    [ -n "$local_port" ] || fail "kubectl port-forward svc/$service gave no local port in 15s"
    base="http://127.0.0.1:$local_port"
fi

# ---- the server ---------------------------------------------------------------------------------
wait_for /health "$deadline"
wait_for /ready "$deadline"
http GET "$base/metrics"
[ "$status" = 200 ] || fail "GET /metrics answered $status, not 200, at $base"

model=${VERIFY_MODEL:-}
if [ -z "$model" ]; then
    http GET "$base/v1/models"
    [ "$status" = 200 ] || fail "GET /v1/models answered $status, not 200, at $base (MINIVLLM_API_KEY?)"
    model=$(grep -o '"id": *"[^"]*"' "$tmp/body" | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/' || true)
    [ -n "$model" ] || fail "GET /v1/models at $base listed no model"
fi

body=$(printf '{"model": "%s", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": %d, "temperature": 0}' \
    "$model" "$max_tokens")
: >"$tmp/times"
for i in $(seq 1 "$requests"); do
    http POST "$base/v1/chat/completions" "$body"
    if [ "$status" = 000 ]; then
        fail "POST /v1/chat/completions #$i: no answer from $base ($(transport_error))"
    fi
    if [ "$status" != 200 ]; then
        fail "POST /v1/chat/completions #$i answered $status, not 200: $(head -c 200 "$tmp/body" | tr '\n' ' ')"
    fi
    grep -q '"choices"' "$tmp/body" || fail "POST /v1/chat/completions #$i: no choices in the answer"
    echo "$seconds" >>"$tmp/times"
done
# nearest-rank p95: the ceil(0.95 n)-th smallest latency
p95=$(sort -g "$tmp/times" | awk '{ t[NR] = $1 } END { i = int(0.95 * NR); if (i < 0.95 * NR) i++; printf "%.3f", t[i] }')
awk -v p="$p95" -v limit="$p95_limit" 'BEGIN { exit !(p <= limit) }' ||
    fail "chat completions p95 latency ${p95}s over $requests requests exceeds ${p95_limit}s ($base, model $model)"

echo "verify-deployment: OK $base${release:+ (release $release)}: /health, /ready, /metrics 200; $requests chat completions of '$model', p95 ${p95}s <= ${p95_limit}s"
