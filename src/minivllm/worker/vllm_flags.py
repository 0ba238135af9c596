"""Settings written as `vllm serve` flags, as worker-vllm v2.24+ users write them: a YAML config
file (``vllm serve --config``, worker-vllm's ``VLLM_CONFIG_FILE``) whose keys are long flag names
(``max-model-len: 8192``), and ``VLLM_EXTRA_ARGS`` (raw flags: ``--max-num-seqs 64 --no-enforce-eager``).

Both give ``{setting name: value}`` (dashes become underscores); values stay as written and are
validated by the settings schema. Flags that mean nothing to this engine are accepted with a
logged note (IGNORED_FLAGS); any other unknown flag is the caller's to reject, naming it.
"""

from __future__ import annotations

import logging
import shlex
from typing import Any

logger = logging.getLogger(__name__)

# vLLM flags whose worker-vllm env names differ from ours.
FLAG_ALIASES = {
    "served_model_name": "openai_served_model_name_override",
    "chat_template": "custom_chat_template",
}

# vLLM flags this engine has no use for, and why: accepted so worker-vllm configs load unchanged.
IGNORED_FLAGS = {
    "trust_remote_code": "GPT-OSS runs no remote code",
    "enable_chunked_prefill": "chunked prefill is always on",
    "tool_call_parser": "harmony tool calls are parsed natively",
    "enable_auto_tool_choice": "tool choice is always available",
    "reasoning_parser": "harmony reasoning is parsed natively",
    "enable_log_requests": "requests are not logged one by one",
    "disable_log_requests": "requests are not logged one by one",
    "uvicorn_log_level": "use --log-level",
    "disable_log_stats": "stats are served on /metrics",
}


class FlagError(ValueError):
    pass


def read_config_file(path: str) -> dict[str, Any]:
    """A `vllm serve --config` YAML file as {setting: value}."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise FlagError(f"cannot read the config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlagError(f"the config file {path} must be a mapping of flag names to values, got {type(data).__name__}")
    return _settings({str(k): v for k, v in data.items()}, f"the config file {path}")


def parse_extra_args(text: str) -> dict[str, Any]:
    """VLLM_EXTRA_ARGS (``--flag value``, ``--flag=value``, ``--flag``, ``--no-flag``) as {setting: value}."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise FlagError(f"VLLM_EXTRA_ARGS cannot be parsed: {e}") from None
    flags: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise FlagError(f"VLLM_EXTRA_ARGS: expected a --flag, got {token!r}")
        name, eq, value = token[2:].partition("=")
        if eq:
            flags[name] = value
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            flags[name] = tokens[i + 1]
            i += 1
        elif name.startswith("no-"):
            flags[name[3:]] = False
        else:
            flags[name] = True
        i += 1
    return _settings(flags, "VLLM_EXTRA_ARGS")


def _settings(flags: dict[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for flag, value in flags.items():
        name = flag.strip().lstrip("-").replace("-", "_")
        if name in IGNORED_FLAGS:
            logger.info("%s: ignoring %s (%s)", source, flag, IGNORED_FLAGS[name])
            continue
        out[name] = value
    return out
