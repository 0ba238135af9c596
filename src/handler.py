"""RunPod serverless entry point: configure, load the model once, serve jobs.

    python src/handler.py                        # on RunPod (RUNPOD_WEBHOOK_GET_JOB is set)
    python src/handler.py --rp_serve_api         # runpod's local API server (/run, /runsync, ...)
    python src/handler.py --test_input '<json>'  # run one job here, print every output batch
    python src/handler.py                        # locally: runs ./test_input.json the same way

Start-up failures (bad setting, model that will not load) print one line and exit 1, so a broken
worker never sits unhealthy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time


def fail(message: str, hard: bool = False) -> None:
    """Print one line and exit 1. `hard` skips interpreter shutdown: a thread still inside torch's
    C++ code (a model load past its timeout) would abort the process while Python finalizes."""
    print("minivllm worker: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    if hard:
        sys.stdout.flush()
        os._exit(1)
    sys.exit(1)


def local_test_job(argv: list[str]) -> dict | None:
    """The job to run here, or None when runpod should serve (on RunPod, or --rp_serve_api).
    Mirrors runpod's own choice, which would not iterate a generator handler."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--test_input")
    parser.add_argument("--rp_serve_api", action="store_true")
    args, _ = parser.parse_known_args(argv)
    if args.rp_serve_api or os.environ.get("RUNPOD_REALTIME_PORT"):
        return None
    if args.test_input is not None:
        source, text = "--test_input", args.test_input
    elif os.environ.get("RUNPOD_WEBHOOK_GET_JOB"):
        return None
    elif os.path.exists("test_input.json"):
        with open("test_input.json", encoding="utf-8") as f:
            source, text = "test_input.json", f.read()
    else:
        fail("no job to run: pass --test_input '<json>', add test_input.json, or start with --rp_serve_api")
    try:
        job = json.loads(text)
    except ValueError as e:
        fail(f"{source} is not valid JSON: {e}")
    if not isinstance(job, dict) or "input" not in job:
        fail(f'{source} must be a job object: {{"input": {{...}}}}')
    return job


def main() -> None:
    from minivllm.worker.config import ConfigError, WorkerConfig

    try:
        config = WorkerConfig.load()
    except ConfigError as e:
        fail(str(e))
    test_job = local_test_job(sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("minivllm.worker")

    # import runpod takes ~2 s: do it while the model loads.
    runpod_import = threading.Thread(target=_import_runpod, daemon=True)
    if test_job is None:
        runpod_import.start()

    from minivllm import AsyncEngine
    from minivllm.worker import make_concurrency_modifier, make_handler, run_test_job

    start = time.perf_counter()
    loaded: list = []  # the engine, or the error that stopped it
    loader = threading.Thread(target=_load, args=(AsyncEngine, config, loaded), daemon=True)
    loader.start()
    loader.join(config.vllm_startup_timeout)
    if not loaded:
        fail(f"the model {config.model or '(embedded default)'} did not load within VLLM_STARTUP_TIMEOUT "
             f"({config.vllm_startup_timeout:g} s)", hard=True)
    if isinstance(loaded[0], Exception):
        fail(f"cannot load model {config.model or '(embedded default)'}: {loaded[0]}")
    engine = loaded[0]
    try:
        from minivllm.openai.serving import OpenAIServing

        serving = OpenAIServing(engine, config.served_model_id, max_model_len=engine.engine.max_model_len,
                                response_role=config.openai_response_role,
                                force_include_usage=config.enable_force_include_usage,
                                chat_template=config.custom_chat_template, limits=config.limits())
    except Exception as e:
        fail(f"cannot set up the OpenAI routes: {e}")
    log.info("model %s ready in %.1f s", config.served_model_id, time.perf_counter() - start)
    handler = make_handler(engine, serving, config, _batch_service(config, serving, log))

    if test_job is not None:
        ok = asyncio.run(run_test_job(handler, test_job))
        engine.shutdown()
        sys.exit(0 if ok else 1)

    runpod_import.join()
    import runpod

    from minivllm.startup_gc import freeze_startup_objects

    freeze_startup_objects()

    runpod.serverless.start({
        "handler": handler,
        "concurrency_modifier": make_concurrency_modifier(config),
        "return_aggregate_stream": True,
    })


def _batch_service(config, serving, log):
    """The Batch API for jobs, when its store outlives the worker: BATCH_STORE, or SQLite on the
    network volume (BASE_PATH, default /runpod-volume). None otherwise: a batch kept on a worker's
    own disk would vanish with it."""
    volume = config.base_path or "/runpod-volume"
    if config.batch_store is None and not os.path.isdir(volume):
        return None
    from minivllm.batches.service import BatchService

    try:
        return BatchService.create(serving.dispatch, store_url=config.batch_store,
                                   data_dir=os.path.join(volume, "minivllm", "batches"))
    except Exception as e:  # a bad URL, an unreachable database: the rest of the worker still serves
        log.error("Batch API off: its store cannot be opened: %s", e)
        return None


def _load(engine_class, config, out: list) -> None:
    try:
        out.append(engine_class.from_engine_args(config.engine_args()))
    except Exception as e:  # reported by the main thread
        out.append(e)


def _import_runpod() -> None:
    try:
        import runpod  # noqa: F401
    except Exception:  # reported by the main thread's own import
        pass


if __name__ == "__main__":
    main()
