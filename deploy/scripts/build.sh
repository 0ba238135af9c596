#!/usr/bin/env bash
# Build the images with docker buildx bake (docker-bake.hcl), one Dockerfile stage or all of them.
#
#   deploy/scripts/build.sh essentials [BAKE FLAGS...]   stage `essentials` (CUDA, torch, deps) -> :VERSION-essentials
#   deploy/scripts/build.sh cuda       [BAKE FLAGS...]   stage `cuda` (FA3 + csrc wheels)       -> :VERSION-cuda
#   deploy/scripts/build.sh server     [BAKE FLAGS...]   bake target `worker`: the server image  -> :VERSION
#   deploy/scripts/build.sh all        [BAKE FLAGS...]   bake group `default`: worker + worker-gpt-oss-20b
#
# BAKE FLAGS go to `docker buildx bake` as they are: --push, --load, --print (the plan, nothing
# built), --progress=plain, ... DRY_RUN=1 prints the command instead of running it. The bake
# variables (DOCKERHUB_REPO, DOCKERHUB_IMG, RELEASE_VERSION, HUGGINGFACE_ACCESS_TOKEN, MAX_JOBS,
# NVCC_THREADS) come from the environment, as docker-bake.hcl reads them.
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

[ $# -ge 1 ] || usage
what=$1
shift

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
repo=${DOCKERHUB_REPO:-runpod}
img=${DOCKERHUB_IMG:-worker-minivllm}
version=${RELEASE_VERSION:-0.1.0}

# The bake file has targets for whole images only; an intermediate stage is the `worker` target
# built to that stage, under its own tag. It still reads the worker's registry cache, but writes
# only inline cache: exporting a one-stage build to :buildcache would replace the full cache.
case "$what" in
    essentials | cuda)
        targets=(worker --set "worker.target=$what" --set "worker.tags=$repo/$img:$version-$what"
            --set "worker.cache-to=type=inline")
        ;;
    server)
        targets=(worker)
        ;;
    all)
        targets=(default)
        ;;
    -h | --help)
        usage
        ;;
    *)
        echo "build.sh: unknown image '$what' (essentials, cuda, server or all)" >&2
        exit 2
        ;;
esac

cmd=(docker buildx bake -f "$root/docker-bake.hcl" "${targets[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
cd "$root"
exec "${cmd[@]}"
