#!/usr/bin/env bash
# Download (not install) the pure-Python / small wheels the device machine lacks, for every CPython
# it may run, into .gpu_wheels/ (gitignored; carried to the device by gpu_session.sh's caller).
set -eu
cd "$(dirname "$0")/.."
for py in 3.10 3.11 3.12 3.13; do
    pip download -q --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --python-version "$py" -d .gpu_wheels pydantic pydantic-core annotated-types typing-inspection \
        typing-extensions openai-harmony bpe-openai tqdm
done
du -sh .gpu_wheels
