"""One typed schema for the RunPod worker: every engine arg plus the worker's own settings.

Sources, later wins: the schema's defaults < the YAML file ``VLLM_CONFIG_FILE`` names (`vllm serve
--config` keys) < environment variables < ``VLLM_EXTRA_ARGS`` (raw `vllm serve` flags) <
``/local_model_args.json`` (written by baked images; path overridable with ``LOCAL_MODEL_ARGS_PATH``).
Every setting is read from its UPPER_CASE name; worker-vllm's names (``MODEL_NAME``,
``MODEL_REVISION``, ``TOKENIZER_NAME``) and both spellings of its batch-size variables are read too.
A bad value fails start-up with a message naming where it came from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

from pydantic import Field, ValidationError

from minivllm.config import EngineArgs
from minivllm.limits import RequestLimits
from minivllm.worker.vllm_flags import FLAG_ALIASES, FlagError, parse_extra_args, read_config_file

logger = logging.getLogger(__name__)

DEFAULT_LOCAL_MODEL_ARGS_PATH = "/local_model_args.json"
DEFAULT_SERVED_MODEL_NAME = "tiny-gpt-oss"  # the embedded default model (EngineArgs.model=None)

# Names read besides (or instead of) the plain UPPER_CASE field name, first one preferred.
# worker-vllm's code read MIN_BATCH_SIZE / BATCH_SIZE_GROWTH_FACTOR while its docs said DEFAULT_*;
# the model is MODEL_NAME only (a bare MODEL is too common a name to claim).
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "model": ("MODEL_NAME",),
    "revision": ("MODEL_REVISION", "REVISION"),
    "tokenizer": ("TOKENIZER_NAME", "TOKENIZER"),
    "hf_token": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "default_min_batch_size": ("DEFAULT_MIN_BATCH_SIZE", "MIN_BATCH_SIZE"),
    "default_batch_size_growth_factor": ("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", "BATCH_SIZE_GROWTH_FACTOR"),
}
_SECRET_FIELDS = {"hf_token"}


class ConfigError(ValueError):
    """A setting has a bad value; the message names where it came from."""


class WorkerConfig(EngineArgs, RequestLimits):
    """Engine args and request limits (inherited) + RunPod worker settings."""

    max_concurrency: int = Field(30, ge=1, description="Jobs one worker runs at once (concurrency_modifier).")
    default_batch_size: int = Field(
        50, ge=1, description="Largest stream batch: tokens per choice (native) or SSE events (OpenAI).")
    default_min_batch_size: int = Field(1, ge=1, description="First stream batch size; batches grow from it.")
    default_batch_size_growth_factor: float = Field(
        3.0, gt=0, description="Each stream batch is this many times the last (float allowed; <= 1: fixed size).")
    # 500 ms, not less: every batch is one HTTP POST to RunPod, and at GPU speed a 50-token batch
    # fills in well under that, so the limit only acts on slow streams.
    stream_flush_ms: float = Field(
        500.0, ge=0, description="Send a partial stream batch once its first item has waited this long (0: never).")
    raw_openai_output: bool = Field(
        True, description="OpenAI streams: yield raw SSE text (true) or lists of chunk objects.")
    openai_served_model_name_override: str | None = Field(None, description="Model id shown by the OpenAI routes.")
    served_model_name: str | None = Field(
        None, description="Model id when no override is set (baked images write it; default: the repo id).")
    openai_response_role: str = Field("assistant", description="Role of chat completion messages.")
    enable_force_include_usage: bool = Field(False, description="Always include usage in OpenAI streams.")
    custom_chat_template: str | None = Field(None, description="Chat template passed to the OpenAI serving layer.")
    base_path: str | None = Field(
        None, description="Storage root (worker-vllm); downloads go to BASE_PATH/huggingface-cache/hub.")
    batch_store: str | None = Field(
        None, description="Batch API store (postgresql://...; default: SQLite on the network volume at BASE_PATH, "
                          "when one is mounted): jobs then reach /v1/files and /v1/batches.")
    models_file: str | None = Field(
        None, description="A models file (YAML, as `minivllm serve --models`): several models behind this worker, "
                          "picked by each job's `model`; MODEL_NAME and the other engine settings then apply to "
                          "every model that does not set them.")
    request_timeout: float = Field(3600.0, gt=0, description="Seconds one job may run before it fails (worker-vllm's).")
    vllm_startup_timeout: float = Field(
        1200.0, gt=0, description="Seconds the model may take to load before the worker exits with an error.")

    def engine_args(self) -> EngineArgs:
        args = self.model_dump(include=set(EngineArgs.model_fields))
        if args["download_dir"] is None and self.base_path:
            args["download_dir"] = os.path.join(self.base_path, "huggingface-cache", "hub")
        return EngineArgs(**args)

    @property
    def served_model_id(self) -> str:
        """The id the OpenAI routes show: the override, else the repo id, never a snapshot path."""
        if self.openai_served_model_name_override:
            return self.openai_served_model_name_override
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEFAULT_SERVED_MODEL_NAME
        return repo_id_of(self.model) or self.model

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             local_args_path: str | None = None) -> "WorkerConfig":
        """Defaults < environment < local_model_args.json. Raises ConfigError on a bad value."""
        environ = os.environ if environ is None else environ
        if local_args_path is None:
            local_args_path = environ.get("LOCAL_MODEL_ARGS_PATH") or DEFAULT_LOCAL_MODEL_ARGS_PATH
        values, origins = {}, {}
        try:
            if environ.get("VLLM_CONFIG_FILE"):
                path = environ["VLLM_CONFIG_FILE"]
                _add_flags(values, origins, read_config_file(path), f"the config file {path} (VLLM_CONFIG_FILE)")
            env_values, env_origins = _from_env(environ)
            values.update(env_values)
            origins.update(env_origins)
            if environ.get("VLLM_EXTRA_ARGS"):
                _add_flags(values, origins, parse_extra_args(environ["VLLM_EXTRA_ARGS"]), "VLLM_EXTRA_ARGS")
        except FlagError as e:
            raise ConfigError(str(e)) from None
        local = _read_local_args(local_args_path)
        repo_ids = [repo_id_of(v) for v in (local.get("model"), values.get("model")) if isinstance(v, str)]
        shown_path = local_args_path.replace("{", "{{").replace("}", "}}")
        for name, value in local.items():
            values[name], origins[name] = value, f"{env_names(name)[0]}{{got}} in {shown_path}"
        # A baked image's model is a local snapshot path; its repo id (from the path or from the
        # MODEL_NAME the image was built with) is what clients know it by.
        if "served_model_name" not in values and any(repo_ids):
            values["served_model_name"] = next(r for r in repo_ids if r)
            origins["served_model_name"] = "MODEL_NAME{got}"
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError(_explain(e, values, origins)) from None


def _add_flags(values: dict, origins: dict, flags: dict, source: str) -> None:
    for flag_name, value in flags.items():
        flag = "--" + flag_name.replace("_", "-")
        name = FLAG_ALIASES.get(flag_name, flag_name)
        if name not in WorkerConfig.model_fields:
            raise ConfigError(f"{source}: unknown setting {flag} (see the README's settings table)")
        values[name], origins[name] = value, f"{flag}{{got}} in {source}"


def env_names(field: str) -> tuple[str, ...]:
    """The environment variables a setting is read from, preferred first."""
    return ENV_NAMES.get(field, (field.upper(),))


def _from_env(environ: Mapping[str, str], fields=None) -> tuple[dict, dict]:
    values, origins = {}, {}
    for field in fields or WorkerConfig.model_fields:
        found = [(name, environ[name]) for name in env_names(field) if environ.get(name, "") != ""]
        if not found:
            continue  # unset and empty both mean "use the default", as in worker-vllm
        if len({v for _, v in found}) > 1:
            shown = " and ".join(f"{n}={_show(field, v)}" for n, v in found)
            raise ConfigError(f"{shown} disagree: set only one of them")
        name, value = found[0]
        values[field], origins[field] = value, f"environment variable {name}{{got}}"
    return values, origins


def _read_local_args(path: str) -> dict:
    """local_model_args.json: keys are env names (MODEL_NAME, ...) or field names (model, ...)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    by_name = {n: field for field in WorkerConfig.model_fields for n in (*env_names(field), field.upper())}
    out = {}
    for key, value in data.items():
        field = by_name.get(str(key).upper())
        if field is None:
            logger.warning("%s: ignoring unknown setting %r", path, key)
        elif value not in (None, ""):
            out[field] = value
    return out


_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def repo_id_of(model: str) -> str | None:
    """'owner/name' for a hub repo id or a hub-cache snapshot folder; None for other paths."""
    m = _SNAPSHOT.search(model)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if _REPO_ID.match(model) and not os.path.exists(model):
        return model
    return None


def _show(field: str, value) -> str:
    return "***" if field in _SECRET_FIELDS else json.dumps(value) if not isinstance(value, str) else repr(value)


def _explain(error: ValidationError, values: dict, origins: dict) -> str:
    parts = []
    for err in error.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        got = f"={_show(field, values[field])}" if field in values else ""
        origin = origins.get(field, field + "{got}").format(got=got)
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"bad value for {origin}: {msg}")
    return "; ".join(parts)


def env_var_table() -> str:
    """The README's table of worker settings, generated from the schema."""
    rows = ["| Environment variable | Setting | Default | Description |", "|---|---|---|---|"]
    for field, info in WorkerConfig.model_fields.items():
        names = " / ".join(f"`{n}`" for n in env_names(field))
        default = "" if info.default is None else f"`{json.dumps(info.default)}`"
        rows.append(f"| {names} | `{field}` | {default} | {info.description or ''} |")
    return "\n".join(rows)


def engine_settings_from_env(environ: Mapping[str, str] | None = None) -> dict:
    """The engine args set by environment variables (for `minivllm serve`: between its config
    file and its flags)."""
    values, _ = _from_env(os.environ if environ is None else environ, EngineArgs.model_fields)
    return values
