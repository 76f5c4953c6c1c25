"""Text to token ids and back, for GGUF files and Hugging Face model directories.

Encoding runs in the Rust `tokenizers` library. Decoding is ours: every token id maps to the raw bytes
it stands for, and text is the UTF-8 decoding of their concatenation. That one definition serves both
`Tokenizer.decode` and `IncrementalDetokenizer`, so streamed text always adds up to the full decode.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

# GGUF token types (llama.cpp's llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_SPECIAL_TYPES = (_UNKNOWN, _CONTROL)

_SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Pre-tokenizer regexes, applied in turn as llama.cpp does (src/llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Written as escapes because these ranges include characters that Unicode normalization would rewrite.
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    _CJK,
    "\\p{N}+",
)
_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for files from before `tokenizer.ggml.pre` existed.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(
        ("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "gigachat", "mellum", "exaone4"),
        (_GPT2,),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"),
        (_LLAMA3,),
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo"), (_QWEN2,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2)
    ),
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
}
# Llama-3-style vocabularies: llama.cpp takes a word that is itself a token before trying merges,
# and adds BOS unless the file says otherwise.
_LLAMA3_FAMILY = frozenset(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"))


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _gpt2_byte_alphabet()


def _unmap_byte_level(token: str) -> bytes:
    try:
        return bytes(map(_BYTE_OF_CHAR.__getitem__, token))
    except KeyError:  # not spelled in the byte alphabet; the byte-level decoder keeps such text as is
        return token.encode()


def _unmap_sentencepiece(token: str, byte_fallback: bool = True) -> bytes:
    match = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace(_SPM_SPACE, " ").encode()


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary, the way transformers derives them for GGUF files.

    Every split of a token into two vocabulary pieces becomes a merge ranked by the whole token's score,
    so BPE reproduces SentencePiece's highest-score-first merging.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        splits.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += splits
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str) -> Backend:
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
        ignore_merges=pre in _LLAMA3_FAMILY,
    )
    backend = Backend(bpe)
    # llama.cpp refuses unknown names; the plain GPT-2 split is the closest guess (and what transformers does).
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in _PRE_TOKENIZERS.get(pre, (_GPT2,))]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return backend


def _sentencepiece_backend(metadata: Mapping[str, Any], add_space_prefix: bool) -> Backend:
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = metadata.get("tokenizer.ggml.merges")
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=(
            [tuple(m.split(" ", 1)) for m in merges]
            if merges
            else _merges_from_scores(tokens, metadata["tokenizer.ggml.scores"])
        ),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Backend(bpe)
    # "first" (not "always") matches transformers: no extra '▁' after a special token, nor before a leading space.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPM_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    return backend


def _add_gguf_added_tokens(backend: Backend, tokens: list[str], types: list[int]) -> set[int]:
    """Make control and user-defined tokens match whole wherever they appear in text (as in llama.cpp and
    transformers), rather than being spelled out of pieces; returns the ids of the special ones."""
    special_ids = {i for i, t in enumerate(types) if t in _SPECIAL_TYPES}
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids) if tokens[i]]
    )
    user_defined = [tok for tok, t in zip(tokens, types) if t == _USER_DEFINED and tok]
    backend.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in user_defined])
    return special_ids


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _hf_decoding(decoder: dict[str, Any] | None, path: Path) -> tuple[Callable[[str], bytes], bool]:
    """How tokenizer.json's decoder spells bytes in tokens, and whether it drops a leading prefix space."""
    steps = (decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]) if decoder else []
    kinds = {step["type"] for step in steps}
    if "ByteLevel" in kinds:
        unmap = _unmap_byte_level
    elif kinds & {"ByteFallback", "Metaspace", "Replace"}:
        unmap = partial(_unmap_sentencepiece, byte_fallback="ByteFallback" in kinds)
    else:
        raise ValueError(f"unsupported tokenizer.json decoder {sorted(kinds)} in {path}")
    strip_leading_space = any(
        (step["type"] == "Strip" and step.get("start", 0) >= 1)
        or (step["type"] == "Metaspace" and step.get("prepend_scheme", "always") != "never")
        for step in steps
    )
    return unmap, strip_leading_space


def _hf_token_id(backend: Backend, config: Mapping[str, Any], generation: Mapping[str, Any], name: str) -> int | None:
    """The id of `name` ('bos_token'...) from tokenizer_config.json, else from generation_config.json."""
    content = _token_content(config.get(name))
    found = backend.token_to_id(content) if content else None
    return found if found is not None else next(iter(_ids(generation.get(f"{name}_id"))), None)


def _post_processor_additions(backend: Backend, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor puts BOS in front of / EOS after the text."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    adds_bos = bos_id is not None and full[:1] == [bos_id] and bare[:1] != [bos_id]
    adds_eos = eos_id is not None and full[-1:] == [eos_id] and bare[-1:] != [eos_id]
    return adds_bos, adds_eos


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates; "default" is the one for plain chat
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", next(iter(named.values()), None))
    return template


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in a sandbox configured like transformers', so templates render the same."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which chat templates do not expect.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Encodes text to token ids and decodes them back, for one model's vocabulary."""

    def __init__(
        self,
        backend: Backend,
        token_bytes: list[bytes],
        special_ids: set[int],
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        add_eos: bool,
        strip_leading_space: bool,
        chat_template: str | None,
    ) -> None:
        """Prefer `from_gguf_metadata` or `from_hf_dir`; `strip_leading_space` drops the space that
        SentencePiece's prefix adds to the first word, as transformers' decoders do."""
        self._backend = backend
        self._bytes = token_bytes
        # Skipping special tokens is the common case, so give it its own table rather than a test per token.
        self._visible_bytes = [b"" if i in special_ids else b for i, b in enumerate(token_bytes)]
        self._special_ids = frozenset(special_ids)
        self.vocab_size = len(token_bytes)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self._add_bos = add_bos and bos_token_id is not None
        self._add_eos = add_eos and bool(self.eos_token_ids)
        self.strip_leading_space = strip_leading_space
        self.chat_template = chat_template

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes ('gpt2' byte-level BPE or 'llama' SentencePiece)."""
        model = metadata["tokenizer.ggml.model"]
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if model == "gpt2":
            backend = _byte_level_backend(tokens, metadata["tokenizer.ggml.merges"], pre)
            unmap = _unmap_byte_level
            strip_leading_space = False
            add_bos_default = pre in _LLAMA3_FAMILY
        elif model == "llama":
            strip_leading_space = metadata.get("tokenizer.ggml.add_space_prefix", True)
            backend = _sentencepiece_backend(metadata, strip_leading_space)
            unmap = _unmap_sentencepiece
            add_bos_default = True
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")

        special_ids = _add_gguf_added_tokens(backend, tokens, types)
        # Control and user-defined tokens are stored as plain text, not in the vocabulary's own spelling.
        token_bytes = [
            tok.encode() if t in (_UNKNOWN, _CONTROL, _USER_DEFINED) else unmap(tok) for tok, t in zip(tokens, types)
        ]
        eos_ids = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
        return cls(
            backend,
            token_bytes,
            special_ids,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[i for i in eos_ids if i is not None],
            add_bos=metadata.get("tokenizer.ggml.add_bos_token", add_bos_default),
            add_eos=metadata.get("tokenizer.ggml.add_eos_token", False),
            strip_leading_space=strip_leading_space,
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a Hugging Face model directory (tokenizer.json and its companions)."""
        path = Path(path)
        spec = _read_json(path / "tokenizer.json")
        if not spec:
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        backend = Backend.from_str(json.dumps(spec))

        unmap, strip_leading_space = _hf_decoding(spec.get("decoder"), path)
        added = backend.get_added_tokens_decoder()
        token_bytes = [
            added[i].content.encode() if i in added else unmap(backend.id_to_token(i) or "")
            for i in range(backend.get_vocab_size(with_added_tokens=True))
        ]
        bos_id = _hf_token_id(backend, config, generation, "bos_token")
        eos_id = _hf_token_id(backend, config, generation, "eos_token")
        adds_bos, adds_eos = _post_processor_additions(backend, bos_id, eos_id)
        return cls(
            backend,
            token_bytes,
            {i for i, tok in added.items() if tok.special},
            bos_token_id=bos_id,
            eos_token_ids=_ids(eos_id) + _ids(generation.get("eos_token_id")),
            add_bos=config.get("add_bos_token", adds_bos),
            add_eos=config.get("add_eos_token", adds_eos),
            strip_leading_space=strip_leading_space,
            chat_template=_hf_chat_template(path, config),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become single ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self._add_eos:
            ids.append(self.eos_token_ids[0])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        text = b"".join(map(self._pieces(skip_special_tokens).__getitem__, ids)).decode("utf-8", errors="replace")
        if self.strip_leading_space and text.startswith(" "):
            return text[1:]
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes `token_id` stands for (part of a UTF-8 character for some tokens)."""
        return self._bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control token, left out of text when skipping special tokens."""
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for a conversation, rendered with the model's (or the given) chat template."""
        source = chat_template or self.chat_template
        if source is None:
            raise ValueError("this model has no chat template; pass one with chat_template=")
        return _compile_template(source).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
            **template_kwargs,
        )

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._backend.id_to_token(token_id) or ""

    def _pieces(self, skip_special_tokens: bool) -> list[bytes]:
        return self._visible_bytes if skip_special_tokens else self._bytes


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text, one token at a time.

    Each token's bytes go through an incremental UTF-8 decoder, so a character split across tokens is
    emitted once complete and never as U+FFFD; the text added up equals `Tokenizer.decode` of all ids.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_token_ids: Sequence[int] = ()
    ) -> None:
        """`prompt_token_ids` give context only: a character the prompt leaves unfinished completes in the
        generated text, and the first generated word keeps its leading space."""
        self._pieces = tokenizer._pieces(skip_special_tokens)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = tokenizer.strip_leading_space
        self._chunks: list[str] = []
        self._next(b"".join(map(self._pieces.__getitem__, prompt_token_ids)))

    def add(self, token_id: int) -> str:
        """The text completed by `token_id` ("" while a multi-byte character is still incomplete)."""
        return self._emit(self._next(self._pieces[token_id]))

    def flush(self) -> str:
        """Call when the sequence ends: an unfinished character becomes U+FFFD, as in a full decode."""
        return self._emit(self._next(b"", final=True))

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._chunks) > 1:  # joined lazily so add() stays O(1) while text is read rarely
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _next(self, data: bytes, final: bool = False) -> str:
        new = self._utf8.decode(data, final)
        if new and self._strip_pending:
            self._strip_pending = False
            if new.startswith(" "):
                return new[1:]
        return new

    def _emit(self, new: str) -> str:
        if new:
            self._chunks.append(new)
        return new
