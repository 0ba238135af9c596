"""Find a checkpoint (local folder, hub repo, or the embedded tiny default) and load it.

MXFP4 expert tensors are copied as packed u8 and never dequantized here. Every tensor is checked
against the shape the config implies before any request is served. Under tensor parallelism each
rank reads only its slice of each sharded tensor (safetensors' get_slice), so its memory holds
about 1/tp of the weights.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import safe_open

from minivllm.distributed.parallel_state import tp_rank
from minivllm.model.gpt_oss import GptOssForCausalLM

if TYPE_CHECKING:
    from minivllm.model.eagle3 import Eagle3Head

logger = logging.getLogger(__name__)

# HF stores unquantized experts (E, in, out); we keep every expert weight (E, out, in) like MXFP4.
_TRANSPOSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EAGLE3_UNUSED = ("t2d", "verifier_norm.weight", "verifier_lm_head.weight")  # training-time tensors


def resolve_model_path(model: str | None, revision: str | None = None, token: str | None = None,
                       download_dir: str | None = None) -> str:
    """A local folder holding config.json + safetensors, downloading from the hub if needed."""
    if model is None:
        from minivllm.model.tiny import default_model_path

        return default_model_path()
    if os.path.isdir(model):
        return model
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither a local folder nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model, revision=revision, token=token or os.environ.get("HF_TOKEN"), cache_dir=download_dir,
            allow_patterns=["*.json", "*.safetensors"], ignore_patterns=["original/*", "metal/*"],
        )
    except Exception as e:  # hub errors come in many classes; the message is what the user needs
        raise ValueError(f"could not download model {model!r} (revision {revision or 'main'}): {e}") from e


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    files = [os.path.join(path, n) for n in names]
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"checkpoint shard {f} listed in the index is missing")
    return files


def load_weights(model: GptOssForCausalLM, path: str) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                param = params.get(name)
                if param is None:
                    unexpected.append(name)
                    continue
                tensor = _read(f, name, param)
                if name.endswith(_TRANSPOSED):
                    tensor = tensor.transpose(-1, -2)
                _check(name, file, tensor, param)
                param.data.copy_(tensor)
                loaded.add(name)
    if unexpected:
        quant = [n for n in unexpected if n.endswith(("_blocks", "_scales")) or "experts" in n]
        hint = (" (the checkpoint's experts are stored differently than config.json's quantization_config says)"
                if quant else "")
        raise ValueError(f"unexpected tensor(s) in checkpoint {path}: {', '.join(unexpected[:5])}{hint}")
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {path} is missing tensor(s): {', '.join(missing[:5])}{more}")


def _read(f, name: str, param: torch.Tensor) -> torch.Tensor:
    """The tensor, or this rank's slice of it (see `tp_shard` in gpt_oss.py); zeros for a bias
    that only rank 0 adds."""
    if getattr(param, "tp_rank0_only", False) and tp_rank() != 0:
        return torch.zeros(f.get_slice(name).get_shape(), dtype=param.dtype)
    spec = getattr(param, "tp_shard", None)
    if spec is None:
        return f.get_tensor(name)
    dim, start, end = spec
    if name.endswith(_TRANSPOSED):  # the checkpoint holds (E, in, out): our dims 1 and 2 swap
        dim = 3 - dim
    return f.get_slice(name)[(slice(None),) * dim + (slice(start, end),)]


def _check(name: str, file: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"tensor {name} in {os.path.basename(file)} has shape {tuple(tensor.shape)}, "
                         f"but config.json implies {tuple(param.shape)}")
    if (param.dtype == torch.uint8) != (tensor.dtype == torch.uint8):
        raise ValueError(f"tensor {name} in {os.path.basename(file)} has dtype {tensor.dtype}, expected "
                         f"{'packed uint8 (MXFP4)' if param.dtype == torch.uint8 else 'a floating-point dtype'}")


def load_tensor(path: str, name: str) -> torch.Tensor:
    """One whole tensor of a checkpoint, from whichever of its safetensors files holds it."""
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise ValueError(f"checkpoint {path} has no tensor {name}")


def load_eagle3_weights(head: Eagle3Head, path: str, target_embedding: Callable[[], torch.nn.Module]) -> None:
    """Load an EAGLE-3 head's safetensors into `head`. The speculators layout is the head's own
    names; the ModelOpt/EAGLE layout's `midlayer.` is layer 0. A head without `embed_tokens`
    shares the target's embedding (as vLLM does; `target_embedding()` gives it); `t2d` is not
    needed (d2t maps draft to target)."""
    from torch import nn

    tensors = dict(head.named_parameters())
    tensors["d2t"] = head.d2t
    own_embedding = None
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for stored in f.keys():
                name = stored.removeprefix("model.").replace("midlayer.", "layers.0.", 1)
                if name in _EAGLE3_UNUSED or name.endswith(_IGNORED_SUFFIXES):
                    continue
                tensor = f.get_tensor(stored)
                if name == "embed_tokens.weight":
                    own_embedding = tensor
                    continue
                target = tensors.get(name)
                if target is None:
                    unexpected.append(stored)
                    continue
                if name == "d2t":
                    tensor = tensor.long()
                _check(name, file, tensor, target)
                target.data.copy_(tensor)
                loaded.add(name)
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in EAGLE-3 head {path}: {', '.join(unexpected[:5])}")
    missing = sorted(set(tensors) - loaded - ({"d2t"} if head.config.draft_vocab_size == head.config.target_vocab_size
                                              else set()))
    if missing:
        raise ValueError(f"EAGLE-3 head {path} is missing tensor(s): {', '.join(missing[:5])}")
    if own_embedding is None:
        head.embed_tokens = target_embedding()
    else:
        weight = head.fc.weight  # the head's device and dtype
        expected = (head.config.target_vocab_size, head.config.hidden_size)
        if tuple(own_embedding.shape) != expected:
            raise ValueError(f"tensor embed_tokens.weight in EAGLE-3 head {path} has shape "
                             f"{tuple(own_embedding.shape)}, but config.json implies {expected}")
        head.embed_tokens = nn.Embedding.from_pretrained(own_embedding.to(device=weight.device, dtype=weight.dtype))
