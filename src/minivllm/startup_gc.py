"""Keep Python's garbage collector off the serving path."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (torch, pydantic, the model's modules: ~300k) to the
    permanent generation, as vLLM does, so a full collection scans only what requests allocate.
    Scanning them all holds the GIL ~110 ms here (several times that on a loaded host): the event
    loop, /health and every stream stalled for that long in the middle of serving."""
    gc.collect()
    gc.freeze()
