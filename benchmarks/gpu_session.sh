#!/usr/bin/env bash
# Every GPU check and benchmark (issues 6, 7, 8) in one device call; results land in $OUT.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, once: the few wheels the device lacks -> .gpu_wheels/
#   device: run(command="bash benchmarks/gpu_session.sh", carry=[".gpu_wheels"], timeout_s=570)
#
# Each step has its own time limit so one slow step cannot eat the others' device time.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
step() {  # step NAME SECONDS CMD...: run, log to $OUT/NAME.txt, never abort the session
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "rc=$?" >> "$OUT/$name.txt"
    tail -n 25 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
deps="pydantic openai-harmony bpe-openai tqdm"
pip install -q --no-index --find-links .gpu_wheels $deps 2>&1 | tail -n 2 \
    || pip install -q --break-system-packages --no-index --find-links .gpu_wheels $deps 2>&1 | tail -n 2
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 2
if ! python -c "import minivllm.kernels" 2>/dev/null; then  # no usable setuptools there: map it by hand
    ln -sfn ../../kernels src/minivllm/kernels
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
python -c "import minivllm.kernels, minivllm.tokenizer, pydantic; print('imports ok')"
export MINIVLLM_CACHE=${MINIVLLM_CACHE:-/tmp/minivllm-cache}

step gpu_tests 240 python -m pytest -q -x tests/test_gpu_moe.py tests/test_gpu_attention.py
# Async scheduling (pinned sampled ids, the next step's inputs gathered on the device) and EAGLE-3
# (its head through the GPU attention ops) on CUDA: same outputs as the synchronous engine.
step gpu_async_eagle3 90 python -m pytest -q -x tests/test_async_scheduling.py tests/test_eagle3.py
step gpu_tensor_parallel 120 python -m pytest -q -rs tests/test_tensor_parallel.py -k gpu  # skips on < 2 GPUs
step bench_moe 90 python benchmarks/bench_moe_gpu.py --profile
step bench_attention 90 python benchmarks/bench_attention_gpu.py --json "$OUT/attention.json"
step bench_engine 360 python benchmarks/bench_gpu.py --profile --out "$OUT/bench_gpu.json"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # decode tok/s at tp 2, to set beside tp 1's above
    step bench_engine_tp2 300 python benchmarks/bench_gpu.py --skip-hf --tensor-parallel-size 2 --out "$OUT/bench_gpu_tp2.json"
fi
