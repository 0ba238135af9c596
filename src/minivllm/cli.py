"""The `minivllm` command: serve (OpenAI server), generate (one completion), write-tiny (a random checkpoint).

Engine flags are derived from the EngineArgs schema (one flag per field), so they never drift.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing

from pydantic import ValidationError

from minivllm.config import EngineArgs

logger = logging.getLogger("minivllm.cli")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine", "EngineArgs fields (unset flags keep the schema's defaults)")
    for name, field in EngineArgs.model_fields.items():
        kind = field.annotation
        optional = False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            optional = type(None) in typing.get_args(kind)
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = field.description or ""
        if field.default is not None:
            help_text += f" (default: {field.default})"
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            kwargs["choices"] = typing.get_args(kind)
        else:
            kwargs["type"] = _or_none(kind) if optional and kind in (int, float) else kind
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def _or_none(kind: type):
    """An optional number's flag: `none` sets it to None (e.g. --background-priority none)."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def engine_args_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EngineArgs:
    given = {name: getattr(args, name) for name in EngineArgs.model_fields if hasattr(args, name)}
    positional = getattr(args, "model_tag", None)
    if positional is not None:
        if given.get("model") not in (None, positional):
            parser.error(f"MODEL {positional!r} and --model {given['model']!r} disagree: give one")
        given["model"] = positional
    try:
        return EngineArgs(**given)
    except ValidationError as e:
        problems = [f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                    for err in e.errors(include_url=False)]
        parser.error("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minivllm", description="GPT-OSS inference with vLLM's interfaces.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (plus RunPod endpoint emulation)")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="HF repo id or local folder; omitted: the embedded tiny random GPT-OSS")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("MINIVLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $MINIVLLM_API_KEY)")
    serve.add_argument("--served-model-name", help="the model id clients use (default: MODEL as given)")
    serve.add_argument("--models", metavar="FILE.yaml", default=os.environ.get("MODELS_FILE") or None,
                       help="serve the models this file lists (loaded on demand, swapped when memory allows "
                            "one; see the README); engine flags given beside it apply to every model "
                            "(default: $MODELS_FILE)")
    serve.add_argument("--response-role", default="assistant", help="role of generated chat messages")
    serve.add_argument("--enable-force-include-usage", action="store_true",
                       help="send usage at the end of every stream, asked for or not")
    serve.add_argument("--chat-template", help="Jinja chat template (file or text) instead of harmony rendering")
    serve.add_argument("--config", metavar="FILE.yaml",
                       help="a `vllm serve --config` YAML file (keys are long flag names, e.g. max-model-len: 8192); "
                            "precedence: defaults < this file < environment variables < flags")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--shutdown-drain-s", type=float, default=os.environ.get("SHUTDOWN_DRAIN_S", "30"),
                       help="on SIGTERM, seconds running requests and RunPod jobs get to finish before "
                            "they are aborted / failed (default: $SHUTDOWN_DRAIN_S or 30)")
    serve.add_argument("--data-dir", default=os.environ.get("MINIVLLM_DATA_DIR"),
                       help="Batch API files and SQLite store (default: $MINIVLLM_DATA_DIR, else "
                            "<MINIVLLM_CACHE or ~/.cache/minivllm>/batches)")
    serve.add_argument("--batch-store", default=os.environ.get("BATCH_STORE"),
                       help="Batch API store URL: postgresql://user:pw@host/db lets several replicas share "
                            "batches (default: $BATCH_STORE, else SQLite in --data-dir)")
    serve.add_argument("--batch-max-in-flight", type=int, default=16, help="batch lines in the engine at once")
    serve.add_argument("--max-waiting-requests", type=int, default=os.environ.get("MAX_WAITING_REQUESTS"),
                       help="answer new OpenAI requests 503 + Retry-After while this many are queued "
                            "(default: $MAX_WAITING_REQUESTS, else unlimited)")
    add_engine_args(serve)
    serve.set_defaults(func=serve_command, parser=serve)

    gen = sub.add_parser("generate", help="print one completion of PROMPT")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    add_engine_args(gen)
    gen.set_defaults(func=generate_command, parser=gen)

    from minivllm.batches.cli import add_batch_parser

    add_batch_parser(sub)

    tiny = sub.add_parser("write-tiny", help="write the tiny random GPT-OSS checkpoint to PATH")
    tiny.add_argument("path", metavar="PATH")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=write_tiny_command, parser=tiny)
    return parser


def with_config_and_env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse the command line over defaults from the --config file, then the engine args set
    by environment variables (MAX_MODEL_LEN, ...): flags given on the command line still win."""
    from minivllm.worker.config import engine_settings_from_env
    from minivllm.worker.vllm_flags import FlagError, read_config_file

    try:
        defaults = read_config_file(args.config) if args.config else {}
    except FlagError as e:
        parser.error(str(e))
    dests = {action.dest for action in parser._actions}
    unknown = sorted("--" + k.replace("_", "-") for k in defaults if k not in dests)
    if unknown:
        parser.error(f"the config file {args.config}: unknown setting(s) {', '.join(unknown)}")
    env = engine_settings_from_env()
    if not defaults and not env:
        return args
    parser.set_defaults(**{**defaults, **env})
    reparsed = parser.parse_args(args.argv[1:])  # the subcommand's own arguments
    reparsed.argv = args.argv
    return reparsed


def serve_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import uvicorn

    from minivllm.batches.service import BatchService
    from minivllm.limits import RequestLimits
    from minivllm.model_manager import ModelManager
    from minivllm.openai.serving import OpenAIServing
    from minivllm.server.app import create_app
    from minivllm.startup_gc import freeze_startup_objects

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = with_config_and_env(parser, args)
    models_file = models_file_from(parser, args)
    worker = _runpod_worker()
    limits = worker[1].limits() if worker else RequestLimits()  # MAX_N, MAX_LOGPROBS, ... from the environment

    def make_serving(engine, name: str, response_store) -> OpenAIServing:
        return OpenAIServing(engine, name, max_model_len=engine.engine.max_model_len,
                             response_role=args.response_role, force_include_usage=args.enable_force_include_usage,
                             chat_template=args.chat_template, limits=limits, response_store=response_store)

    models = ModelManager(models_file, make_serving, limits=limits)
    try:
        if models_file.preload:
            models.preload()
    except (ValueError, OSError, RuntimeError) as e:  # bad model, checkpoint or template: one clear line
        sys.exit(f"minivllm serve: {e}")
    try:
        batches = BatchService.create(models.dispatch, store_url=args.batch_store, data_dir=args.data_dir,
                                      max_in_flight=args.batch_max_in_flight, engine_streams=lambda: models.num_streams)
    except Exception as e:  # a bad URL, an unreachable database
        sys.exit(f"minivllm serve: batch store: {e}")
    handler = worker[0](None, None, worker[1], models=models) if worker else None
    app = create_app(models=models, api_key=args.api_key, runpod_handler=handler,
                     runpod_max_concurrency=worker[1].max_concurrency if worker else None,
                     shutdown_drain_s=args.shutdown_drain_s, max_waiting_requests=args.max_waiting_requests,
                     batches=batches)
    # uvicorn's own limit comes a little after ours: by then every stream was told it was aborted.
    server = draining_server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                            timeout_graceful_shutdown=args.shutdown_drain_s + 5))
    logger.info("serving %s on http://%s:%d", ", ".join(models.models), args.host, args.port)
    freeze_startup_objects()
    try:
        server.run()
    finally:
        models.shutdown()
    return 0


def models_file_from(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The --models file, or MODEL (and the engine flags) as a one-entry registry; a bad file exits
    with one line naming it and the field."""
    from minivllm.model_registry import ModelEntry, ModelsFile, ModelsFileError, load_models_file

    if args.models is None:
        return ModelsFile(models=[ModelEntry.of(engine_args_from(parser, args), args.served_model_name)])
    model_flag = any(a == "--model" or a.startswith("--model=") for a in args.argv)
    if args.model_tag is not None or model_flag or args.served_model_name:
        parser.error("--models lists the models (and their served names): give no MODEL, --model "
                     "or --served-model-name beside it")
    engine_defaults = {name: getattr(args, name) for name in EngineArgs.model_fields
                       if hasattr(args, name) and name != "model"}  # (MODEL_NAME in the environment)
    try:
        return load_models_file(args.models, engine_defaults)
    except ModelsFileError as e:
        sys.exit(f"minivllm serve: {e}")


def _runpod_worker():
    """(make_handler, its config from the environment, as on RunPod) when the RunPod worker
    package is installed alongside; its routes then run the very handler of src/handler.py."""
    try:
        from minivllm.worker import WorkerConfig, make_handler
    except ImportError as e:
        logger.info("RunPod emulation routes are off (%s)", e)
        return None
    try:
        return make_handler, WorkerConfig.load()
    except ValueError as e:  # ConfigError: a bad worker env value, named in the message
        sys.exit(f"minivllm serve: {e}")


def draining_server(config):
    """A uvicorn.Server for our app: on SIGTERM/SIGINT /ready and new requests turn 503 at once,
    in-flight requests and RunPod jobs get the drain limit to finish, then the process exits 0."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            self.config.app.state.server.request_drain()
            super().handle_exit(sig, frame)
            # uvicorn re-raises a caught signal once shut down (the exit status would read "killed by
            # SIGTERM"); a drained shutdown is the clean exit an orchestrator expects: status 0.
            self._captured_signals.clear()

    return DrainingServer(config)


def generate_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minivllm.llm import LLM
    from minivllm.sampling_params import SamplingParams

    engine_args = engine_args_from(parser, args)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.sampling_seed)
    except ValueError as e:
        parser.error(str(e))
    llm = LLM(**engine_args.model_dump())
    print(llm.generate(args.prompt, params, use_tqdm=False)[0].outputs[0].text)
    return 0


def write_tiny_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from minivllm.model.tiny import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.path, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args.func(args.parser, args)  # the subcommand's parser, so errors show its usage


if __name__ == "__main__":
    sys.exit(main())
