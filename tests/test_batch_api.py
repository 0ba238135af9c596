"""The Batch API (/v1/files, /v1/batches) on 127.0.0.1 with the embedded tiny model, driven by the
real `openai` SDK, plus `minivllm batch run` and the RunPod job door. Crash / restart and
PostgreSQL replicas: test_batch_durability.py.
"""

import argparse
import asyncio
import base64
import io
import json
import socket
import time
import tracemalloc

import openai
import pytest

from conftest import serve_in_thread
from minivllm.batches.files import FileStorage, receive_upload, write_file
from minivllm.batches.runner import BatchRunner
from minivllm.batches.service import BatchService
from minivllm.batches.store import Store
from minivllm.openai import OpenAIServing
from minivllm.openai.errors import OpenAIError
from minivllm.server.app import create_app

MODEL = "tiny-test"
FINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    serving = OpenAIServing(engine, MODEL, max_model_len=engine.engine.max_model_len)
    service = BatchService.create(serving.dispatch, data_dir=str(tmp_path_factory.mktemp("batch-data")),
                                  max_in_flight=4, poll_s=0.05)
    app = create_app(engine, serving, batches=service)
    with serve_in_thread(app) as url:
        yield url, service, serving


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def chat_line(custom_id, content="Hello", max_tokens=4, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     **body}}


def jsonl(items) -> bytes:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items).encode()


def upload(client, items, name="input.jsonl"):
    return client.files.create(file=(name, io.BytesIO(jsonl(items))), purpose="batch")


def wait_answered(client, batch_id, at_least: int, timeout=60.0) -> None:
    """Until at least `at_least` lines of the batch are answered."""
    deadline = time.monotonic() + timeout
    while client.batches.retrieve(batch_id).request_counts.completed < at_least:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def wait_final(client, batch_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.05)


def lines_of(client, file_id) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_files_api(server, client):
    data = jsonl([chat_line("a"), chat_line("b")])
    created = client.files.create(file=("mine.jsonl", io.BytesIO(data)), purpose="batch")
    assert created.id.startswith("file-") and created.bytes == len(data) and created.filename == "mine.jsonl"
    assert created.purpose == "batch" and created.status == "processed"
    assert client.files.retrieve(created.id).model_dump() == created.model_dump()
    assert client.files.content(created.id).content == data
    extra = [upload(client, [chat_line("c")], f"more{i}.jsonl") for i in range(3)]
    page = client.files.list(limit=2, purpose="batch")
    assert [f.id for f in page.data] == [extra[2].id, extra[1].id] and page.has_more
    assert [f.id for f in client.files.list(limit=2, after=extra[1].id).data] == [extra[0].id, created.id]
    every = [f.id for f in client.files.list(limit=1)]  # the SDK follows the cursor
    assert every[:4] == [extra[2].id, extra[1].id, extra[0].id, created.id]
    # Also under /openai/v1, as every other OpenAI route.
    other = openai.OpenAI(base_url=server[0] + "/openai/v1", api_key="unused", max_retries=0)
    assert other.files.retrieve(created.id).id == created.id
    deleted = client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="fine-tune")


def test_upload_is_streamed_and_limited(server, tmp_path):
    """receive_upload writes as data arrives and stops at the limit, leaving nothing behind."""
    store = Store(f"sqlite:///{tmp_path}/s.db")
    storage = FileStorage(store, str(tmp_path))
    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body(n_blocks):
        yield head
        for _ in range(n_blocks):
            yield b"x" * (256 << 10)
        yield tail

    ctype = f"multipart/form-data; boundary={boundary}"
    row = asyncio.run(receive_upload(storage, ctype, body(12), max_bytes=4 << 20))
    assert row["bytes"] == 12 * (256 << 10) and row["filename"] == "big.jsonl"
    assert sum(len(b) for b in storage.read(row)) == row["bytes"]
    with pytest.raises(OpenAIError) as e:
        asyncio.run(receive_upload(storage, ctype, body(20), max_bytes=4 << 20))
    assert e.value.status_code == 413
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [row["id"]]  # no .part left
    # The route refuses an announced body over 200 MB before reading it.
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {300 << 20}\r\n\r\n".encode() + head)
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413") and "200 MB" in answer
    store.close()


def test_batch_runs_to_completed(client):
    items = [chat_line(f"req-{i}", f"Question {i}") for i in range(12)]
    batch = client.batches.create(input_file_id=upload(client, items).id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    assert batch.created_at and batch.expires_at == batch.created_at + 24 * 3600
    batch = wait_final(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 12, "completed": 12, "failed": 0}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    out = lines_of(client, batch.output_file_id)
    assert [line["custom_id"] for line in out] == [f"req-{i}" for i in range(12)]  # one each, in input order
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"] == response["body"]["id"]
        assert response["body"]["object"] == "chat.completion" and response["body"]["model"] == MODEL
        assert response["body"]["usage"]["completion_tokens"] <= 4
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.model == MODEL
    usages = [line["response"]["body"]["usage"] for line in out]
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usages) > 0
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usages) > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens


@pytest.mark.parametrize("endpoint,body,kind", [
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 3}, "text_completion"),
    ("/v1/responses", {"input": "Say hi", "max_output_tokens": 3}, "response"),
])
def test_batch_other_endpoints(client, endpoint, body, kind):
    items = [{"custom_id": f"x{i}", "method": "POST", "url": endpoint, "body": body} for i in range(3)]
    batch = client.batches.create(input_file_id=upload(client, items).id, endpoint=endpoint, completion_window="24h")
    batch = wait_final(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    assert [line["response"]["body"]["object"] for line in lines_of(client, batch.output_file_id)] == [kind] * 3
    assert batch.usage.input_tokens > 0 and 0 < batch.usage.output_tokens <= 9  # each endpoint's own usage names


def test_bad_lines_go_to_the_error_file(client):
    items = [
        chat_line("good-1"),
        "this is not json",
        chat_line("good-1"),  # duplicate custom_id
        {**chat_line("wrong-method"), "method": "GET"},
        {**chat_line("wrong-url"), "url": "/v1/completions"},
        {"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": "hi"}},
        chat_line("streams", stream=True),
        chat_line("no-such-model", model="gpt-9"),  # valid line, answered 404 at run time
        "",  # blank lines are skipped
        chat_line("good-2"),
    ]
    batch = client.batches.create(input_file_id=upload(client, items).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = wait_final(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 9, "completed": 2, "failed": 7}
    assert [line["custom_id"] for line in lines_of(client, batch.output_file_id)] == ["good-1", "good-2"]
    errors = lines_of(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == [None, "good-1", "wrong-method", "wrong-url", "bad-body", "streams",
                                                "no-such-model"]
    reasons = [e["error"]["message"] if e["error"] else "" for e in errors]
    assert "Line 2 is not valid JSON" in reasons[0]
    assert "used by an earlier line" in reasons[1]
    assert "method must be 'POST'" in reasons[2]
    assert "differs from the batch's endpoint" in reasons[3]
    assert "messages" in reasons[4]
    assert "stream must be false" in reasons[5]
    missing = errors[6]
    assert missing["error"] is None and missing["response"]["status_code"] == 404
    assert missing["response"]["body"]["error"]["code"] == "model_not_found"


def test_file_that_is_not_a_batch_fails(client):
    batch = client.batches.create(input_file_id=upload(client, ["", "  "]).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = wait_final(client, batch.id)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors.data[0].code == "empty_file"
    assert batch.output_file_id is None and batch.error_file_id is None


def test_create_and_cancel_errors(client):
    file_id = upload(client, [chat_line("a")]).id
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    done = wait_final(client, client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                    completion_window="24h").id)
    with pytest.raises(openai.ConflictError, match="completed"):
        client.batches.cancel(done.id)


def test_list_batches_paginates(client):
    file_id = upload(client, [chat_line("a")]).id
    made = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h").id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [made[2], made[1]] and page.has_more
    assert client.batches.list(limit=2, after=made[1]).data[0].id == made[0]
    assert [b.id for b in client.batches.list(limit=1)][:3] == made[::-1]  # auto-pagination
    for batch_id in made:
        wait_final(client, batch_id)


def test_cancel_stops_the_batch_and_keeps_what_finished(server, client, engine):
    items = [chat_line(f"long-{i}", max_tokens=48) for i in range(40)]
    batch = client.batches.create(input_file_id=upload(client, items).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_answered(client, batch.id, 2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = wait_final(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts.total == 40 and 2 <= counts.completed < 40 and counts.failed == 0
    out = lines_of(client, batch.output_file_id)
    assert len(out) == counts.completed and len({line["custom_id"] for line in out}) == counts.completed
    deadline = time.monotonic() + 10  # every aborted line let go of its KV blocks
    llm = engine.engine
    while llm.requests or llm.block_manager.num_free_blocks != llm.block_manager.num_blocks:
        assert time.monotonic() < deadline, "cancelled lines still hold engine requests"
        time.sleep(0.05)


def test_50000_lines_are_accepted(client):
    """The most a batch may have: every line validated and stored (then cancelled: running 50,000
    lines is not the point here); one more line fails the file."""
    line = jsonl([chat_line("x", "hi", max_tokens=1)]).decode()
    data = "".join(line.replace('"x"', f'"r{i}"', 1) for i in range(50_000)).encode()
    start = time.monotonic()
    batch = client.batches.create(input_file_id=client.files.create(file=("big.jsonl", io.BytesIO(data)),
                                                                    purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    while (batch := client.batches.retrieve(batch.id)).status == "validating":
        assert time.monotonic() - start < 60
        time.sleep(0.1)
    assert batch.status == "in_progress" and batch.request_counts.total == 50_000
    assert batch.request_counts.failed == 0
    client.batches.cancel(batch.id)
    batch = wait_final(client, batch.id)
    assert batch.status == "cancelled" and batch.request_counts.total == 50_000

    too_many = data + line.replace('"x"', '"one-more"', 1).encode()
    batch = client.batches.create(input_file_id=client.files.create(file=("big.jsonl", io.BytesIO(too_many)),
                                                                    purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_final(client, batch.id)
    assert batch.status == "failed" and batch.errors.data[0].code == "too_many_lines"
    assert batch.errors.data[0].line == 50_001


def test_validation_memory_is_bounded(tmp_path):
    """Validating a 40 MB file holds a page of lines at a time, not the file."""
    store = Store(f"sqlite:///{tmp_path}/s.db")
    storage = FileStorage(store, str(tmp_path))
    body = json.dumps(chat_line("X", "y" * 2000, max_tokens=1)).encode() + b"\n"
    row = write_file(storage, (body.replace(b'"X"', b'"c%d"' % i, 1) for i in range(20_000)), "in.jsonl", "batch")
    assert row["bytes"] > 40e6
    runner = BatchRunner(store, storage, dispatch=None)
    tracemalloc.start()
    try:
        total = runner._load_lines({"id": "b", "input_file_id": row["id"], "endpoint": "/v1/chat/completions"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 20_000 and store.counts("b") == {"pending": 20_000}
    assert peak < row["bytes"] / 4, f"peak {peak / 1e6:.1f} MB while validating {row['bytes'] / 1e6:.1f} MB"
    store.close()


def test_runpod_jobs_reach_the_batch_api(server):
    """openai_route jobs: the same service, files in base64."""
    service = server[1]

    async def flow():
        data = jsonl([chat_line("rp-1"), chat_line("rp-2")])
        made = await service.dispatch("/v1/files", {"file": base64.b64encode(data).decode(),
                                                    "filename": "job.jsonl", "purpose": "batch"})
        assert made["object"] == "file" and made["bytes"] == len(data)
        batch = await service.dispatch("/openai/v1/batches", {"input_file_id": made["id"],
                                                              "endpoint": "/v1/chat/completions",
                                                              "completion_window": "24h"})
        while batch["status"] not in FINAL:
            await asyncio.sleep(0.05)
            batch = await service.dispatch(f"/v1/batches/{batch['id']}", None)
        content = await service.dispatch(f"/v1/files/{batch['output_file_id']}/content", {})
        listed = await service.dispatch("/v1/batches", {"limit": 1})
        deleted = await service.dispatch(f"/v1/files/{made['id']}", None, "DELETE")
        with pytest.raises(OpenAIError) as e:
            await service.dispatch("/v1/files", {"file": "not base64!", "purpose": "batch"})
        assert e.value.status_code == 400
        return batch, base64.b64decode(content["content"]).decode(), listed, deleted

    # The runner lives on the server's event loop; dispatch only touches the store.
    batch, text, listed, deleted = asyncio.run(flow())
    assert batch["status"] == "completed"
    assert [json.loads(line)["custom_id"] for line in text.splitlines()] == ["rp-1", "rp-2"]
    assert listed["data"][0]["id"] == batch["id"] and deleted["deleted"]


def test_batch_run_command(tmp_path, capsys):
    """`minivllm batch run` (wired by the main CLI through add_batch_parser)."""
    from minivllm.batches.cli import add_batch_parser

    source = tmp_path / "in.jsonl"
    items = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": f"Count {i}", "max_tokens": 2}} for i in range(6)] + ["{broken"]
    source.write_bytes(jsonl(items))
    parser = argparse.ArgumentParser(prog="minivllm")
    add_batch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"),
                              "--max-model-len", "512", "--num-kv-blocks", "64"])
    assert args.func(args.parser, args) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in out] == [f"c{i}" for i in range(6)] + [None]
    assert all(line["response"]["status_code"] == 200 for line in out[:6])
    assert out[6]["response"] is None and "not valid JSON" in out[6]["error"]["message"]
    err = capsys.readouterr().err
    assert "6 of 7 line(s) answered, 1 failed" in err and "7/7" in err  # the progress bar


def test_runner_yields_to_realtime_requests(tmp_path):
    """While the engine runs requests that are not the batch's, and for a cool-down after, new
    lines start only up to busy_in_flight; alone, up to max_in_flight."""
    store = Store(f"sqlite:///{tmp_path}/s.db")
    storage = FileStorage(store, str(tmp_path))
    realtime = {"n": 0}
    gate = asyncio.Event()

    async def dispatch(route, body, method):
        await gate.wait()
        return {"id": "x", "choices": [{"finish_reason": "length"}]}

    runner = BatchRunner(store, storage, dispatch, max_in_flight=8, busy_in_flight=2, busy_cooldown_s=2.0,
                         engine_streams=lambda: runner._in_engine + realtime["n"])
    store.add_batch({"id": "b", "status": "in_progress", "endpoint": "/v1/chat/completions", "input_file_id": "f",
                     "completion_window": "24h", "created_at": 0, "expires_at": None})
    store.add_lines("b", [{"idx": i, "custom_id": f"c{i}", "body": "{}", "state": "pending", "result": None}
                          for i in range(20)])

    async def run():
        realtime["n"] = 3
        await runner.step()
        busy = runner.in_flight
        realtime["n"] = 0
        await runner.step()
        cooling_down = runner.in_flight
        await asyncio.sleep(2.05)  # the cool-down is over
        await runner.step()
        alone = runner.in_flight
        gate.set()
        while runner.in_flight:
            await asyncio.sleep(0.01)
        return busy, cooling_down, alone

    assert asyncio.run(run()) == (2, 2, 8)
    assert store.counts("b") == {"done": 8, "pending": 12}
    store.close()


def test_bench_batch_runs_small():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "benchmarks/bench_batch.py", "--lines", "20", "--window-s", "1",
                          "--idle-requests", "2", "--max-in-flight", "4"], capture_output=True, text=True,
                         timeout=120, cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "while the batch runs" in out.stdout and "batch lines/s: alone" in out.stdout


def test_batch_past_its_window_expires(server, client):
    service = server[1]
    items = [chat_line(f"slow-{i}", max_tokens=48) for i in range(20)]
    batch = client.batches.create(input_file_id=upload(client, items).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_answered(client, batch.id, 1)
    service.store.update_batch(batch.id, expires_at=int(time.time()) - 1)  # as if 24 h went by
    batch = wait_final(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    counts = batch.request_counts
    assert counts.total == 20 and counts.completed >= 1 and counts.completed + counts.failed == 20
    errors = lines_of(client, batch.error_file_id)
    assert len(errors) == counts.failed and {e["error"]["code"] for e in errors} == {"batch_expired"}
    done = {line["custom_id"] for line in lines_of(client, batch.output_file_id)}
    assert done.isdisjoint(e["custom_id"] for e in errors) and len(done) == counts.completed


def test_worker_handler_routes_batch_jobs(server, engine):
    """The RunPod handler: openai_route / route jobs on /v1/files and /v1/batches reach the service."""
    from minivllm.worker import WorkerConfig, make_handler

    _, service, serving = server
    handler = make_handler(engine, serving, WorkerConfig(), service)

    async def job(job_input: dict) -> list:
        return [out async for out in handler({"id": "batch-job", "input": job_input})]

    data = jsonl([chat_line("w-1")])
    made, = asyncio.run(job({"openai_route": "/v1/files", "openai_input": {
        "file": base64.b64encode(data).decode(), "filename": "w.jsonl", "purpose": "batch"}}))
    assert made["object"] == "file"
    listed, = asyncio.run(job({"route": "/v1/files", "body": {"purpose": "batch"}, "method": "GET"}))
    assert made["id"] in [f["id"] for f in listed["data"]]
    deleted, = asyncio.run(job({"route": f"/v1/files/{made['id']}", "method": "DELETE"}))
    assert deleted["deleted"]
    missing, = asyncio.run(job({"openai_route": "/v1/batches/batch_nope"}))
    assert "error" in missing


def test_a_store_from_before_batch_usage_gets_the_new_columns(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/old.db"
    old = Store(url)
    with old.engine.begin() as c:  # as an older version created it
        c.execute(sa.text("ALTER TABLE minivllm_batches DROP COLUMN usage"))
        c.execute(sa.text("ALTER TABLE minivllm_batches DROP COLUMN model"))
    old.close()
    store = Store(url)
    store.add_batch({"id": "b", "status": "in_progress", "endpoint": "/v1/chat/completions", "input_file_id": "f",
                     "completion_window": "24h", "created_at": 0, "expires_at": None})
    assert store.update_batch("b", model="m", usage={"input_tokens": 1})
    assert (store.get_batch("b")["model"], store.get_batch("b")["usage"]) == ("m", {"input_tokens": 1})
    store.close()
