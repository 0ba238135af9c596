#!/usr/bin/env bash
# Deploy, inspect or remove a tensor-parallel profile of the minivllm chart.
#
#   deploy/scripts/deploy.sh tp2|tp8 [deploy|delete|logs|status]
#
#   deploy  (default) wait for free GPUs, helm upgrade --install --wait (deploy-with-retry.sh),
#           then check the release end to end (verify-deployment.sh)
#   delete  helm uninstall (the models claim is kept: helm.sh/resource-policy keep)
#   logs    follow the server logs of every pod of the release
#   status  helm status and the release's pods and Service
#
# Any tpN with a values-tpN.yaml in the chart works (tp1 too). Env: RELEASE (minivllm-tpN),
# NAMESPACE (minivllm), EXTRA_VALUES (more values files, comma-separated, applied after the
# profile, e.g. values-prod.yaml), TIMEOUT_MIN (60: the wait for GPUs), VERIFY_TIMEOUT_S (600),
# HELM (helm), KUBECTL (kubectl).
set -euo pipefail

usage() {
    echo "usage: deploy.sh tp2|tp8 [deploy|delete|logs|status]" >&2
    exit 2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
profile=$1
action=${2:-deploy}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
chart=$(cd "$here/../helm/minivllm" && pwd)
[[ $profile =~ ^tp[0-9]+$ ]] && [ -f "$chart/values-$profile.yaml" ] || usage
values="$chart/values-$profile.yaml${EXTRA_VALUES:+,$EXTRA_VALUES}"
release=${RELEASE:-minivllm-$profile}
namespace=${NAMESPACE:-minivllm}
helm=${HELM:-helm}
kubectl=${KUBECTL:-kubectl}
selector="app.kubernetes.io/instance=$release"

case "$action" in
    deploy)
        "$here/deploy-with-retry.sh" "$release" "$chart" "$values" "$namespace" "${TIMEOUT_MIN:-60}"
        exec "$here/verify-deployment.sh" "$release" "$namespace" "${VERIFY_TIMEOUT_S:-600}"
        ;;
    delete)
        exec "$helm" uninstall "$release" -n "$namespace" --wait
        ;;
    logs)
        exec "$kubectl" logs -n "$namespace" -l "$selector" -c server --prefix --tail=200 --follow --max-log-requests=16
        ;;
    status)
        "$helm" status "$release" -n "$namespace"
        exec "$kubectl" get pods,services -n "$namespace" -l "$selector" -o wide
        ;;
    *)
        usage
        ;;
esac
