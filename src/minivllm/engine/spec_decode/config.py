"""The `speculative_config` engine arg (vLLM's keys), checked once at start.

Torch-free: EngineArgs validates it while the worker parses its settings.
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Speculation is off for a step with more running sequences than this (vLLM's `disable_by_batch_size`):
# a large batch already keeps the GPU busy, so verifying drafts would cost more than they save.
DEFAULT_DISABLE_BY_BATCH_SIZE = 32
_KNOWN = {"method", "model", "revision", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
          "disable_by_batch_size", "draft_tensor_parallel_size"}


def parse_speculative_config(value: Any) -> dict | None:
    """None, or the normalized config: {method: "ngram", num_speculative_tokens, prompt_lookup_min,
    prompt_lookup_max, disable_by_batch_size} or {method: "eagle3", model, revision,
    num_speculative_tokens (None: the head's own), disable_by_batch_size}; raises ValueError naming
    what is wrong.

    Accepts a dict or its JSON text (the form env vars and CLI flags give)."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - _KNOWN)
    if unknown:
        raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_KNOWN))})")
    method = value.get("method")
    if method is None and value.get("model") in ("ngram", "[ngram]"):
        method = "ngram"  # vLLM's older spelling: the method given as the model
    if method == "eagle":
        raise ValueError("speculative_config: method 'eagle' (EAGLE-1 heads) is not supported; "
                         "use 'eagle3' (an EAGLE-3 head) or 'ngram' (prompt lookup)")
    if method not in ("ngram", "[ngram]", "eagle3"):
        raise ValueError(f"speculative_config: method must be 'eagle3' or 'ngram', got {method!r}")
    batch = _int(value, "disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE, low=1)
    k = _int(value, "num_speculative_tokens", None, low=1)
    if value.get("draft_tensor_parallel_size") not in (None, 1):
        logger.info("speculative_config: draft_tensor_parallel_size ignored (the draft runs unsharded)")
    if method == "eagle3":
        model = value.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("speculative_config: method 'eagle3' needs 'model', the draft head's folder or "
                             "Hugging Face repo id (e.g. RedHatAI/gpt-oss-20b-speculator.eagle3)")
        lookup = sorted(key for key in ("prompt_lookup_min", "prompt_lookup_max") if key in value)
        if lookup:
            raise ValueError(f"speculative_config: {', '.join(lookup)} only apply to method 'ngram'")
        # num_speculative_tokens None: the head's own config says (speculators' proposal_methods).
        return {"method": "eagle3", "model": model, "revision": value.get("revision"),
                "num_speculative_tokens": k, "disable_by_batch_size": batch}
    if value.get("model") not in (None, "ngram", "[ngram]"):
        raise ValueError("speculative_config: 'model' names a draft model, which method 'ngram' does not use")
    if k is None:
        raise ValueError("speculative_config: num_speculative_tokens is required (drafted tokens per step, e.g. 3)")
    lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
    # vLLM's defaults: 5 and 5 when neither is given, else the one given for both.
    lo = _int(value, "prompt_lookup_min", hi if hi is not None else 5, low=1)
    hi = _int(value, "prompt_lookup_max", lo, low=1)
    if lo > hi:
        raise ValueError(f"speculative_config: prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi,
            "disable_by_batch_size": batch}


def _int(config: dict, key: str, default, low: int):
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"speculative_config: {key} must be an integer >= {low}, got {value!r}")
    return value
