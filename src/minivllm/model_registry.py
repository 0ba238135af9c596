"""The models file: which models one server can serve, each with its own engine args.

    # models.yaml                       minivllm serve --models models.yaml
    max_loaded_models: 1                # models in memory at once; asking for another swaps
    preload: true                       # load the first model at start (false: on its first request)
    drain_timeout_s: 30                 # a swap waits this long for the old model's running requests
    idle_unload_s: null                 # unload a model nobody used for this long (null: never)
    models:
      - source: openai/gpt-oss-20b      # hub repo id or local folder; absent: the embedded tiny model
        served_name: gpt-oss-20b        # the `model` clients ask for (default: the repo id)
        max_model_len: 8192
        gpu_memory_utilization: 0.9
      - source: /models/gpt-oss-120b
        served_name: gpt-oss-120b
        tensor_parallel_size: 2         # any engine arg (EngineArgs' fields)

A bad file is one ModelsFileError whose message names the file and the field.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from minivllm.config import EngineArgs
from minivllm.worker.config import DEFAULT_SERVED_MODEL_NAME, repo_id_of


class ModelsFileError(ValueError):
    """A models file that cannot be used; the message is one line naming the file and the field."""


def served_name_of(source: str | None) -> str:
    """The id clients see: the repo id (never a hub snapshot path), the embedded default's name."""
    if source is None:
        return DEFAULT_SERVED_MODEL_NAME
    return repo_id_of(source) or source


class ModelEntry(EngineArgs):
    """One model: EngineArgs' fields (checked like flags), `source` for the model, and its served name."""

    model: str | None = Field(None, validation_alias="source",
                              description="HF repo id or local folder; absent: the embedded tiny random GPT-OSS.")
    served_name: str | None = Field(None, description="The `model` clients ask for (default: the repo id).")

    @classmethod
    def of(cls, args: EngineArgs, served_name: str | None = None) -> "ModelEntry":
        """The one-entry registry of `minivllm serve MODEL`."""
        given = args.model_dump(exclude_unset=True, exclude={"model"})
        return cls.model_validate({**given, "source": args.model, "served_name": served_name})

    @property
    def name(self) -> str:
        return self.served_name or served_name_of(self.model)

    def engine_args(self) -> EngineArgs:
        return EngineArgs(**self.model_dump(include=set(EngineArgs.model_fields)))


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1, description="The models, the first being the default.")
    max_loaded_models: int = Field(1, ge=1, description="Models kept in memory at once.")
    preload: bool = Field(True, description="Load the first model at start; false: start idle.")
    drain_timeout_s: float = Field(30.0, ge=0, description="How long a swap lets running requests finish.")
    idle_unload_s: float | None = Field(None, gt=0, description="Unload a model unused this long (None: never).")

    @model_validator(mode="after")
    def _names_differ(self) -> "ModelsFile":
        seen: set[str] = set()
        for i, entry in enumerate(self.models):
            if entry.name in seen:
                raise ValueError(f"models[{i}]: served name {entry.name!r} is used twice (set served_name)")
            seen.add(entry.name)
        return self


def load_models_file(path: str, engine_defaults: dict | None = None) -> ModelsFile:
    """Read and validate a models file. ``engine_defaults`` (engine flags given beside it) apply
    to every model that does not set them itself."""
    import yaml

    where = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ModelsFileError(f"{path}: cannot read it: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ModelsFileError(f"{where}: not valid YAML: {_one_line(str(e))}") from None
    if not isinstance(data, dict):
        raise ModelsFileError(f"{where}: must be a mapping with a `models:` list, got {type(data).__name__}")
    if engine_defaults and isinstance(data.get("models"), list):
        defaults = {("source" if k == "model" else k): v for k, v in engine_defaults.items()}
        data["models"] = [{**defaults, **m} if isinstance(m, dict) else m for m in data["models"]]
    try:
        return ModelsFile.model_validate(data)
    except ValidationError as e:
        raise ModelsFileError(f"{where}: {explain(e)}") from None


def explain(error: ValidationError) -> str:
    """'models[1].max_model_len: Input should be ...', errors joined on one line."""
    parts = []
    for err in error.errors(include_url=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return _one_line("; ".join(parts))


def _one_line(text: str) -> str:
    return " ".join(text.split())
