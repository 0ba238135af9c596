# docker buildx bake                         # base worker + baked gpt-oss-20b (group "default")
# docker buildx bake worker                  # only the base worker image
# HUGGINGFACE_ACCESS_TOKEN=hf_... RELEASE_VERSION=0.1.0 docker buildx bake --push
#
# Every variable can be overridden from the environment of the same name.

variable "DOCKERHUB_REPO" {
  default = "runpod"
}

variable "DOCKERHUB_IMG" {
  default = "worker-minivllm"
}

variable "RELEASE_VERSION" {
  default = "0.1.0"
}

# Read by the baked targets' `secret` (env=HUGGINGFACE_ACCESS_TOKEN) from the environment and
# handed to the build as the secret HF_TOKEN: never a build arg, so never in the image history.
variable "HUGGINGFACE_ACCESS_TOKEN" {
  default = ""
}

# Kernel build parallelism (cuda stage): MAX_JOBS parallel nvcc processes × NVCC_THREADS each.
# An FA3 hopper compile takes several GB of RAM: 4 jobs suit a 32 GB builder, use 2 on 16 GB.
variable "MAX_JOBS" {
  default = "4"
}

variable "NVCC_THREADS" {
  default = "2"
}

group "default" {
  targets = ["worker", "worker-gpt-oss-20b"]
}

target "_common" {
  context    = "."
  dockerfile = "Dockerfile"
  platforms  = ["linux/amd64"]
  args = {
    MAX_JOBS     = "${MAX_JOBS}"
    NVCC_THREADS = "${NVCC_THREADS}"
  }
}

# The base worker: serves MODEL_NAME (set on the endpoint), downloaded into the network volume.
# Registry cache in mode=max keeps every stage (essentials, cuda), so a code-only change rebuilds
# just the server stage.
target "worker" {
  inherits   = ["_common"]
  target     = "server"
  tags       = ["${DOCKERHUB_REPO}/${DOCKERHUB_IMG}:${RELEASE_VERSION}"]
  cache-from = ["type=registry,ref=${DOCKERHUB_REPO}/${DOCKERHUB_IMG}:buildcache"]
  cache-to   = ["type=registry,ref=${DOCKERHUB_REPO}/${DOCKERHUB_IMG}:buildcache,mode=max"]
}

# gpt-oss-20b baked into the image (BASE_PATH=/models, outside the volume's mount point), served
# as "openai/gpt-oss-20b", HF_HUB_OFFLINE=1, non-root. Reuses the worker's stage cache; its own
# cache is inline (the ~13 GB model layer is not pushed a second time as cache).
target "worker-gpt-oss-20b" {
  inherits = ["_common"]
  target   = "server"
  tags     = ["${DOCKERHUB_REPO}/${DOCKERHUB_IMG}:${RELEASE_VERSION}-gpt-oss-20b"]
  args = {
    MODEL_NAME     = "openai/gpt-oss-20b"
    MODEL_REVISION = ""
    BASE_PATH      = "/models"
    RUN_AS         = "worker"
  }
  secret = ["type=env,id=HF_TOKEN,env=HUGGINGFACE_ACCESS_TOKEN"]
  cache-from = [
    "type=registry,ref=${DOCKERHUB_REPO}/${DOCKERHUB_IMG}:buildcache",
    "type=registry,ref=${DOCKERHUB_REPO}/${DOCKERHUB_IMG}:${RELEASE_VERSION}-gpt-oss-20b",
  ]
  cache-to = ["type=inline"]
}
