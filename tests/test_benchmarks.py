"""The benchmarks run in CI at toy sizes, so they never rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_gpu_tiny_mode(tmp_path):
    out = tmp_path / "bench.json"
    stdout = run("benchmarks/bench_gpu.py", "--tiny", "--profile", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["minivllm"]["decode_tok_s"]) == {"1", "4"}
    assert report["transformers"]["decode_tok_s"]["1"] > 0
    assert report["minivllm"]["burst"]["output_tokens"] > 0
    assert report["minivllm"]["profile"]["top_ops"]
    assert "decode tok/s, batch 1" in stdout


def test_bench_offline_and_host_overhead_small():
    out = run("benchmarks/bench_offline.py", "--num-prompts", "3", "--max-tokens", "3", "--max-len", "20",
              "--mixed-range", "2,5")
    assert all(f"{workload:<10}speed-up" in out for workload in ("readme", "mixed", "batch1"))
    assert "per step" in run("benchmarks/bench_host_overhead.py", "--num-seqs", "8", "--steps", "5")


def test_bench_long_prompt_and_robustness_small():
    assert "peak +MB" in run("benchmarks/bench_long_prompt.py", "--sizes", "300", "--chunk", "128")
    out = run("benchmarks/bench_robustness.py", "--per-class", "1", "--long-prompt", "2000")
    assert "0 5xx" in out and "2000-token prompt: status 200" in out


def test_bench_spec_decode_small():
    assert "accept len" in run("benchmarks/bench_spec_decode.py", "--max-tokens", "8", "--batch1-prompts", "1",
                               "--batch", "2", "--repeats", "1")
