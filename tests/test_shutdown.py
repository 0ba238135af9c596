"""SIGTERM on `minivllm serve` (a real subprocess): running work gets the drain limit, then RunPod
jobs still running or queued end FAILED with a message (webhooks sent), streams end with
finish_reason "abort", and the process exits 0 within drain + 5 s."""

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from conftest import free_port, minivllm_command, wait_until_up

DRAIN_S = 4


class Webhooks:
    """A local webhook receiver: collects the JSON bodies POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def long_job(max_tokens: int) -> dict:
    return {"prompt": "go on", "sampling_params": {"max_tokens": max_tokens, "ignore_eos": True}}


def test_sigterm_drains_then_fails_the_rest_and_exits_0(tmp_path):
    hooks = Webhooks()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = minivllm_command()
    env = {**os.environ, "LOCAL_MODEL_ARGS_PATH": str(tmp_path / "absent.json"), "MAX_CONCURRENCY": "2"}
    proc = subprocess.Popen(
        cmd + ["serve", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "8192",
               "--shutdown-drain-s", str(DRAIN_S), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(proc, url + "/ready", timeout=60)
        http = httpx.Client(base_url=url, timeout=60)
        quick = http.post("/run", json={"input": long_job(8), "webhook": hooks.url}).json()["id"]
        # Far more tokens than the drain allows: still running (or queued: MAX_CONCURRENCY=2) at the deadline.
        slow = http.post("/run", json={"input": {"openai_route": "/v1/completions", "openai_input": {
            "prompt": "go on", "max_tokens": 8000, "ignore_eos": True, "stream": True}},
            "webhook": hooks.url}).json()["id"]
        queued = http.post("/run", json={"input": long_job(8000), "webhook": hooks.url}).json()["id"]
        events: list[dict] = []

        def stream() -> None:
            body = {"prompt": "stream on", "max_tokens": 8000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))

        reader = threading.Thread(target=stream)
        reader.start()
        deadline = time.monotonic() + 30
        while http.get(f"/status/{slow}").json()["status"] != "IN_PROGRESS" or not events:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DRAIN_S + 5) == 0, proc.stdout.read()
        assert time.monotonic() - start >= DRAIN_S - 0.5  # the slow work had its drain time
        reader.join(10)
        assert events[-1]["choices"][0]["finish_reason"] == "abort"

        by_id = {hook["id"]: hook for hook in hooks.received}
        assert set(by_id) == {quick, slow, queued}
        assert by_id[quick]["status"] == "COMPLETED"
        for job_id in (slow, queued):
            assert by_id[job_id]["status"] == "FAILED"
            assert "shut down" in by_id[job_id]["error"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hooks.server.shutdown()
