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

    from minivllm.model_manager import ModelManager
    from minivllm.worker import make_concurrency_modifier, make_handler, run_test_job

    models = ModelManager(_models_file(config), _serving_factory(config), limits=config.limits())
    first = models.default.entry.model or "(embedded default)"
    if models.settings.preload:
        start = time.perf_counter()
        loaded: list = []  # None, or the error that stopped the load
        loader = threading.Thread(target=_load, args=(models, loaded), daemon=True)
        loader.start()
        loader.join(config.vllm_startup_timeout)
        if not loaded:
            fail(f"the model {first} did not load within VLLM_STARTUP_TIMEOUT ({config.vllm_startup_timeout:g} s)",
                 hard=True)
        if loaded[0] is not None:
            fail(f"cannot load model {first}: {loaded[0]}")
        log.info("model %s ready in %.1f s", models.default.name, time.perf_counter() - start)
    handler = make_handler(None, None, config, _batch_service(config, models, log), models=models)

    if test_job is not None:
        ok = asyncio.run(run_test_job(handler, test_job))
        models.shutdown()
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


def _models_file(config):
    """MODELS_FILE, or the one model of MODEL_NAME & co.; a bad file fails start-up in one line."""
    from minivllm.config import EngineArgs
    from minivllm.model_registry import ModelEntry, ModelsFile, ModelsFileError, load_models_file

    if not config.models_file:
        return ModelsFile(models=[ModelEntry.of(config.engine_args(), config.served_model_id)])
    engine_args = config.engine_args()  # (download_dir under BASE_PATH)
    given = {name: getattr(engine_args, name) for name in (config.model_fields_set & set(EngineArgs.model_fields))
             - {"model"}}
    if engine_args.download_dir:
        given["download_dir"] = engine_args.download_dir
    try:
        return load_models_file(config.models_file, given)
    except ModelsFileError as e:
        fail(f"MODELS_FILE {e}")


def _serving_factory(config):
    def make_serving(engine, name: str, response_store):
        from minivllm.openai.serving import OpenAIServing

        return OpenAIServing(engine, name, max_model_len=engine.engine.max_model_len,
                             response_role=config.openai_response_role,
                             force_include_usage=config.enable_force_include_usage,
                             chat_template=config.custom_chat_template, limits=config.limits(),
                             response_store=response_store)
    return make_serving


def _batch_service(config, models, log):
    """The Batch API for jobs, when its store outlives the worker: BATCH_STORE, or SQLite on the
    network volume (BASE_PATH, default /runpod-volume). None otherwise: a batch kept on a worker's
    own disk would vanish with it."""
    volume = config.base_path or "/runpod-volume"
    if config.batch_store is None and not os.path.isdir(volume):
        return None
    from minivllm.batches.service import BatchService

    try:
        return BatchService.create(models.dispatch, store_url=config.batch_store,
                                   data_dir=os.path.join(volume, "minivllm", "batches"))
    except Exception as e:  # a bad URL, an unreachable database: the rest of the worker still serves
        log.error("Batch API off: its store cannot be opened: %s", e)
        return None


def _load(models, out: list) -> None:
    try:
        models.preload()
        out.append(None)
    except Exception as e:  # reported by the main thread
        out.append(e)


def _import_runpod() -> None:
    try:
        import runpod  # noqa: F401
    except Exception:  # reported by the main thread's own import
        pass


if __name__ == "__main__":
    main()
