"""Batches survive a crash: SIGKILL a server in the middle of a batch, start again, and every line
is answered exactly once. SQLite (one server), and PostgreSQL (a real server started here by
pgserver, from the test extras) with two replicas sharing one batch's lines.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import openai
import pytest

from conftest import free_port, wait_until_up
from minivllm.batches.store import Store

MODEL = "tiny-test"
FINAL = ("completed", "failed", "cancelled", "expired")

SERVER = r"""
import os, uvicorn
from minivllm import AsyncEngine, EngineArgs
from minivllm.batches.service import BatchService
from minivllm.openai import OpenAIServing
from minivllm.server.app import create_app

engine = AsyncEngine.from_engine_args(EngineArgs(model=None, num_kv_blocks=256, max_model_len=1024))
serving = OpenAIServing(engine, "tiny-test", max_model_len=1024)
service = BatchService.create(serving.dispatch, store_url=os.environ["BATCH_STORE"] or None,
                              data_dir=os.environ["BATCH_DATA"], max_in_flight=int(os.environ["MAX_IN_FLIGHT"]),
                              lease_s=float(os.environ["LEASE_S"]), poll_s=0.05, owner=os.environ["REPLICA"])
app = create_app(engine, serving, batches=service)
uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
"""


class Replica:
    def __init__(self, name: str, store_url: str, data_dir: str, *, lease_s: float, max_in_flight: int) -> None:
        self.name, self.port = name, free_port()
        env = {**os.environ, "BATCH_STORE": store_url, "BATCH_DATA": data_dir, "LEASE_S": str(lease_s),
               "MAX_IN_FLIGHT": str(max_in_flight), "REPLICA": name, "PORT": str(self.port)}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def wait_up(self) -> "Replica":
        wait_until_up(self.proc, self.url + "/ready", timeout=90)
        return self

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown code runs
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def replicas():
    from minivllm.model.tiny import default_model_path

    default_model_path()  # written once here, not by two servers at once
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()


def chat_items(n: int, max_tokens: int = 16) -> bytes:
    return "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": f"Tell me about {i}"}],
                                        "max_tokens": max_tokens, "ignore_eos": True}}) + "\n"
                   for i in range(n)).encode()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def wait_final(client, batch_id: str, timeout: float = 120):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in FINAL and b, timeout,
                    f"batch {batch_id} never finished")


def answered(store: Store, batch_id: str) -> dict[str, str]:
    """custom_id -> the recorded answer's line id."""
    return {(line := json.loads(r))["custom_id"]: line["id"] for r in store.results(batch_id, ("done",))}


def check_exactly_once(client, batch, n: int, before: dict[str, str]) -> None:
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in out] == [f"line-{i}" for i in range(n)]  # none lost, none twice
    assert all(line["response"]["status_code"] == 200 for line in out)
    by_id = {line["custom_id"]: line["id"] for line in out}
    assert {cid: by_id[cid] for cid in before} == before  # answers recorded before the crash are kept


def test_sqlite_kill9_then_restart_finishes_every_line_once(replicas, tmp_path):
    n = 48
    data_dir = str(tmp_path / "data")
    first = Replica("first", "", data_dir, lease_s=30, max_in_flight=4)
    replicas.append(first)
    first.wait_up()
    file = first.client.files.create(file=("in.jsonl", io.BytesIO(chat_items(n))), purpose="batch")
    batch = first.client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    wait_for(lambda: first.client.batches.retrieve(batch.id).request_counts.completed >= 8, 90, "no progress")
    first.kill()

    store = Store(f"sqlite:///{data_dir}/batches.db")
    before = answered(store, batch.id)
    counts = store.counts(batch.id)
    assert 8 <= len(before) < n and counts.get("running"), counts  # killed mid-batch, lines in flight
    second = Replica("second", "", data_dir, lease_s=30, max_in_flight=4)
    replicas.append(second)
    second.wait_up()
    check_exactly_once(second.client, wait_final(second.client, batch.id), n, before)
    assert set(store.line_owners(batch.id)) == {"first", "second"}
    store.close()


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server (pgserver ships its binaries in the wheel)."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver (test extra) is not installed")
    # Not under pytest's tmp folder: as root, pgserver runs postgres as its own user, which must
    # reach the data folder (pytest's are private to their owner).
    folder = tempfile.mkdtemp(prefix="minivllm-pg-")
    os.chmod(folder, 0o755)
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as e:  # noqa: BLE001 -- any start-up failure means: no PostgreSQL here
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL (pgserver) cannot run here: {e}")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


def test_postgres_two_replicas_share_a_batch_and_survive_kill9(replicas, postgres, tmp_path):
    n = 48
    # Separate data folders: files live in the database, so either replica serves any file.
    a = Replica("replica-a", postgres, str(tmp_path / "a"), lease_s=2, max_in_flight=3)
    b = Replica("replica-b", postgres, str(tmp_path / "b"), lease_s=2, max_in_flight=3)
    replicas += [a, b]
    a.wait_up()
    b.wait_up()
    data = chat_items(n)
    file = a.client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert b.client.files.content(file.id).content == data
    batch = a.client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")

    store = Store(postgres)
    wait_for(lambda: len(store.line_owners(batch.id)) == 2 and answered(store, batch.id).__len__() >= 10, 90,
             "the two replicas did not both answer lines")
    assert b.client.batches.retrieve(batch.id).status == "in_progress"  # either replica answers GET
    a.kill()  # its leased lines come back to b once the 2 s lease runs out
    before = answered(store, batch.id)
    assert len(before) < n
    done = wait_final(b.client, batch.id)
    check_exactly_once(b.client, done, n, before)
    owners = store.line_owners(batch.id)
    assert set(owners) == {"replica-a", "replica-b"} and sum(owners.values()) == n, owners
    store.close()
