#!/usr/bin/env bash
# Install or upgrade a minivllm release once the cluster has free GPUs for it.
#
#   deploy-with-retry.sh RELEASE CHART VALUES NAMESPACE TIMEOUT_MIN [HELM FLAGS...]
#
# VALUES is a values file, or several separated by commas (later ones win). The chart is rendered
# with `helm template` to learn what the release asks for: `replicas` pods of nvidia.com/gpu each.
# Until that many pods fit on the nodes' free GPUs (allocatable minus what running pods request;
# this release's own pods count as free, an upgrade replaces them) it waits with exponential
# backoff (BACKOFF_INITIAL_S 10, doubling up to BACKOFF_MAX_S 300) for at most TIMEOUT_MIN
# minutes, then runs `helm upgrade --install --wait --timeout HELM_TIMEOUT (30m)` with the
# HELM FLAGS added. A release queued by Kueue (kueue.x-k8s.io/queue-name) skips the wait: Kueue
# admits its pods when the queue's quota has room.
# Env: GPU_NODE_SELECTOR (count only nodes with these labels, e.g. nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3),
# GPU_RESOURCE (nvidia.com/gpu), HELM (helm), KUBECTL (kubectl).
set -euo pipefail

log() { echo "deploy-with-retry: $*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}

if [ $# -lt 5 ]; then
    echo "usage: deploy-with-retry.sh RELEASE CHART VALUES NAMESPACE TIMEOUT_MIN [HELM FLAGS...]" >&2
    exit 2
fi
release=$1 chart=$2 values=$3 namespace=$4 timeout_min=$5
shift 5
helm=${HELM:-helm}
kubectl=${KUBECTL:-kubectl}
resource=${GPU_RESOURCE:-nvidia.com/gpu}
delay=${BACKOFF_INITIAL_S:-10}
max_delay=${BACKOFF_MAX_S:-300}
[[ $timeout_min =~ ^[0-9]+([.][0-9]+)?$ ]] || fail "TIMEOUT_MIN must be a number of minutes, not '$timeout_min'"

values_flags=()
IFS=, read -r -a files <<<"$values"
for f in "${files[@]}"; do
    [ -f "$f" ] || fail "values file $f not found"
    values_flags+=(-f "$f")
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$helm" template "$release" "$chart" -n "$namespace" "${values_flags[@]}" >"$tmp/manifests" 2>"$tmp/err" ||
    fail "helm template $chart: $(tr '\n' ' ' <"$tmp/err")"
# GPUs of one pod (the largest container limit) and the pod count, from the rendered Deployment.
gpus=$(awk -v r="$resource:" '$1 == r { n = $2 + 0; if (n > max) max = n } END { print max + 0 }' "$tmp/manifests")
replicas=$(awk '$1 == "replicas:" { n += $2 } END { print n + 0 }' "$tmp/manifests")

# fitting_pods: how many pods of $gpus GPUs fit on the free GPUs now; writes "node=free ..." to $tmp/free.
fitting_pods() {
    local escaped=${resource//./\\.}
    local node_args=()
    if [ -n "${GPU_NODE_SELECTOR:-}" ]; then node_args=(-l "$GPU_NODE_SELECTOR"); fi
    "$kubectl" get nodes "${node_args[@]}" -o \
        "jsonpath={range .items[*]}{.metadata.name}{\"\\t\"}{.status.allocatable.$escaped}{\"\\t\"}{.spec.unschedulable}{\"\\n\"}{end}" \
        >"$tmp/nodes" 2>"$tmp/err" || fail "kubectl get nodes: $(tr '\n' ' ' <"$tmp/err")"
    "$kubectl" get pods --all-namespaces --field-selector=status.phase!=Succeeded,status.phase!=Failed -o \
        "jsonpath={range .items[*]}{.spec.nodeName}{\"\\t\"}{.metadata.namespace}{\"\\t\"}{.metadata.labels.app\\.kubernetes\\.io/instance}{\"\\t\"}{range .spec.containers[*]}{.resources.requests.$escaped}{\",\"}{end}{\"\\n\"}{end}" \
        >"$tmp/pods" 2>"$tmp/err" || fail "kubectl get pods: $(tr '\n' ' ' <"$tmp/err")"
    awk -F'\t' -v per_pod="$gpus" -v ns="$namespace" -v rel="$release" -v free_out="$tmp/free" '
        FNR == NR { if ($3 != "true" && $2 + 0 > 0) alloc[$1] = $2 + 0; next }
        $1 == "" || !($1 in alloc) || ($2 == ns && $3 == rel) { next }
        { n = split($4, req, ","); for (i = 1; i <= n; i++) used[$1] += req[i] + 0 }
        END {
            fit = 0; line = ""
            for (node in alloc) {
                free = alloc[node] - used[node]
                if (free < 0) free = 0
                fit += int(free / per_pod)
                line = line node "=" free " "
            }
            print line > free_out
            print fit
        }' "$tmp/nodes" "$tmp/pods"
}

if [ "$gpus" -eq 0 ]; then
    log "the release asks for no $resource: no wait"
elif grep -q 'kueue.x-k8s.io/queue-name:' "$tmp/manifests"; then
    log "queued by Kueue: no wait for free GPUs"
else
    deadline=$(awk -v now="$(date +%s)" -v m="$timeout_min" 'BEGIN { printf "%d", now + m * 60 }')
    while :; do
        fit=$(fitting_pods)
        if [ "$fit" -ge "$replicas" ]; then
            log "$replicas pod(s) of $gpus GPU(s) fit (free: $(sed 's/ *$//' "$tmp/free"))"
            break
        fi
        left=$((deadline - $(date +%s)))
        if [ "$left" -le 0 ]; then
            fail "no room for $replicas pod(s) of $gpus $resource within $timeout_min min (free: $(sed 's/ *$//' "$tmp/free"))"
        fi
        wait_s=$(awk -v d="$delay" -v l="$left" 'BEGIN { print (d < l) ? d : l }')
        log "$fit of $replicas pod(s) of $gpus GPU(s) fit (free: $(sed 's/ *$//' "$tmp/free")); retry in ${wait_s}s"
        sleep "$wait_s"
        delay=$(awk -v d="$delay" -v m="$max_delay" 'BEGIN { d *= 2; print (d < m) ? d : m }')
    done
fi

log "helm upgrade --install $release ($namespace)"
exec "$helm" upgrade --install "$release" "$chart" -n "$namespace" --create-namespace "${values_flags[@]}" \
    --wait --timeout "${HELM_TIMEOUT:-30m}" "$@"
