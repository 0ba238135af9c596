"""`minivllm batch run INPUT.jsonl -o OUTPUT.jsonl`: a batch file answered offline, like
`vllm run-batch`, through the same store, runner and serving layer as the Batch API.

OUTPUT gets one line per input line, in input order: answers ({"id", "custom_id", "response",
"error": null}) and errors ({"response": null, "error": {...}}) together. With --data-dir the
store outlives the process: run the same command again after a crash and it resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile

logger = logging.getLogger(__name__)


def add_batch_parser(subparsers) -> None:
    """`minivllm batch run ...` on the main parser's subparsers."""
    from minivllm.cli import add_engine_args

    batch = subparsers.add_parser("batch", help="OpenAI batch files offline")
    sub = batch.add_subparsers(dest="batch_command", required=True)
    run = sub.add_parser("run", help="answer every line of INPUT.jsonl into OUTPUT.jsonl (like vllm run-batch)")
    run.add_argument("input_file", metavar="INPUT.jsonl", nargs="?",
                     help="OpenAI batch lines: {custom_id, method: POST, url, body}")
    run.add_argument("-i", "--input-file", dest="input_flag", help="INPUT.jsonl as a flag (vllm run-batch's -i)")
    run.add_argument("-o", "--output-file", required=True, metavar="OUTPUT.jsonl")
    run.add_argument("--endpoint", help="the lines' url (default: the first line's)")
    run.add_argument("--served-model-name", help="the model name the lines may give (default: MODEL as given)")
    run.add_argument("--max-in-flight", type=int, default=64, help="lines in the engine at once (default 64)")
    run.add_argument("--data-dir", help="keep the batch store here, so a killed run resumes (default: a "
                                        "temporary folder)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(run)
    run.set_defaults(func=batch_run_command, parser=run)


def batch_run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minivllm.cli import engine_args_from
    from minivllm.model_registry import served_name_of
    from minivllm.engine.async_engine import AsyncEngine
    from minivllm.openai.serving import OpenAIServing

    input_path = args.input_flag or args.input_file
    if not input_path:
        parser.error("give INPUT.jsonl")
    if not os.path.isfile(input_path):
        parser.error(f"{input_path}: no such file")
    endpoint = args.endpoint or first_url(input_path)
    engine_args = engine_args_from(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = AsyncEngine.from_engine_args(engine_args)
        serving = OpenAIServing(engine, args.served_model_name or served_name_of(engine_args.model),
                                max_model_len=engine.engine.max_model_len)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"minivllm batch run: {e}")
    try:
        with tempfile.TemporaryDirectory(prefix="minivllm-batch-") as scratch:
            batch = asyncio.run(run_file(serving.dispatch, input_path, args.output_file, endpoint=endpoint,
                                         data_dir=args.data_dir or scratch, max_in_flight=args.max_in_flight,
                                         progress=not args.no_progress))
    finally:
        engine.shutdown()
    counts = batch["request_counts"]
    if batch["status"] != "completed":
        errors = (batch.get("errors") or {}).get("data") or []
        print(f"minivllm batch run: the batch {batch['status']}: "
              + "; ".join(e["message"] for e in errors), file=sys.stderr)
        return 1
    print(f"{counts['completed']} of {counts['total']} line(s) answered, {counts['failed']} failed: "
          f"{args.output_file}", file=sys.stderr)
    return 0


def first_url(path: str) -> str:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    break
                if isinstance(url, str):
                    return url
                break
    return "/v1/chat/completions"


async def run_file(dispatch, input_path: str, output_path: str, *, endpoint: str, data_dir: str,
                   max_in_flight: int = 64, progress: bool = True) -> dict:
    """Run one batch file to the end; returns the batch object. A batch of the same input and
    output still unfinished in data_dir's store is resumed rather than started again."""
    from tqdm import tqdm

    from minivllm.batches.files import write_file
    from minivllm.batches.service import BatchService

    service = BatchService.create(dispatch, data_dir=data_dir, max_in_flight=max_in_flight, poll_s=0.05)
    await service.start()
    try:
        key = {"input": os.path.abspath(input_path), "output": os.path.abspath(output_path)}
        batch_id = await asyncio.to_thread(_unfinished, service, key)
        if batch_id is None:
            row = await asyncio.to_thread(write_file, service.storage, _chunks(input_path),
                                          os.path.basename(input_path), "batch")
            batch_id = (await service.create_batch({"input_file_id": row["id"], "endpoint": endpoint,
                                                    "completion_window": "24h", "metadata": key}))["id"]
        with tqdm(desc="batch", unit="line", disable=not progress) as bar:
            while True:
                batch = await service.retrieve_batch(batch_id)
                counts = batch["request_counts"]
                bar.total = counts["total"] or None
                bar.update(counts["completed"] + counts["failed"] - bar.n)
                if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                    break
                await asyncio.sleep(0.2)
        if batch["status"] == "completed":
            await asyncio.to_thread(_write_output, service, batch_id, output_path)
        return batch
    finally:
        await service.stop()


def _unfinished(service, key: dict) -> str | None:
    for row in service.store.batches_in(("validating", "in_progress", "finalizing")):
        if row["metadata"] == key:
            return row["id"]
    return None


def _chunks(path: str):
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            yield block


def _write_output(service, batch_id: str, output_path: str) -> None:
    """Every answered and failed line, in input order; written aside, then moved into place."""
    folder = os.path.dirname(os.path.abspath(output_path))
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, delete=False, suffix=".part") as f:
        for line in service.store.results(batch_id, ("done", "failed")):
            f.write(line + "\n")
    os.replace(f.name, output_path)
