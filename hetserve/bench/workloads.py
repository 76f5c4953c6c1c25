"""Benchmark workloads: the prompts a run sends, each with its length in tokens and the number of
tokens to ask for. A workload is a pure function of its config, its vocabulary and the seed."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Protocol

import numpy as np

from hetserve.bench import option

WORKLOADS = ("random", "chat", "shared-prefix", "long-context", "mixed", "jsonl")

# Common short English words: without a tokenizer, most of them are one token in most vocabularies.
_WORDS = (
    "the of and to in is was for on that with as by at from his he it an be are this which or had "
    "not but were have one their all been has who they new more can after first two time its her "
    "when also into only other may over some there would these than most such about city world "
    "state year work part where people life house water music river school light paper"
).split()
# A whole lowercase word with its leading space: such tokens split off on their own in byte-level
# BPE and SentencePiece vocabularies alike, so concatenating them never merges across pieces.
_WORD_TOKEN = re.compile(r" [a-z]{2,12}")
_POOL_SIZE = 2000


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_len: int
    max_tokens: int


@dataclass
class WorkloadConfig:
    workload: str = option(
        "random; chat (log-normal lengths like ShareGPT's); shared-prefix (one long common prefix, short "
        "unique suffixes); long-context; mixed (random requests with a few long ones among them: "
        "--mixed-long-fraction of --long-context-len prompt and --mixed-long-output-len output tokens); "
        "jsonl (--dataset-path: one {\"prompt\", \"max_tokens\"} per line).",
        "random")
    num_prompts: int = option("Requests per run (per rate of a sweep).", 100)
    seed: int = option("Seed of prompts, lengths and arrival times.", 0)
    tokenizer: str | None = option(
        "Model whose tokenizer builds the prompts ('default' for the packaged SmolLM2, a .gguf file or a "
        "Hugging Face directory): input lengths are then exact in tokens. Without it prompts are words "
        "and lengths approximate.", None)
    random_input_len: int = option("Prompt tokens of the random workload.", 128)
    random_output_len: int = option(
        "Output tokens per request of the random, shared-prefix and long-context workloads (and of "
        "jsonl lines without max_tokens).", 128)
    random_range_ratio: float = option(
        "Random lengths are uniform in [len*(1-r), len*(1+r)] (vLLM's definition); 0 makes them exact.", 0.0)
    chat_input_len: int = option("Median prompt tokens of the chat workload.", 256)
    chat_output_len: int = option("Median output tokens of the chat workload.", 128)
    chat_sigma: float = option("Log-normal sigma of the chat workload's lengths (clipped at 8x the median).", 0.8)
    prefix_len: int = option("Tokens of the prefix every shared-prefix prompt starts with.", 512)
    suffix_len: int = option("Tokens of each shared-prefix prompt's unique suffix.", 32)
    long_context_len: int = option("Prompt tokens of the long-context workload and of the mixed workload's "
                                   "long requests.", 4096)
    mixed_long_fraction: float = option("Fraction of the mixed workload's requests that are long.", 0.1)
    mixed_long_output_len: int = option("Output tokens of the mixed workload's long requests.", 512)
    dataset_path: str | None = option("JSONL file of the jsonl workload (lines are reused in order if too few).",
                                      None)

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.workload == "jsonl" and not self.dataset_path:
            raise ValueError("the jsonl workload needs --dataset-path")
        for name in ("num_prompts", "random_input_len", "random_output_len", "chat_input_len",
                     "chat_output_len", "prefix_len", "suffix_len", "long_context_len", "mixed_long_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {self.random_range_ratio}")
        if not 0.0 <= self.mixed_long_fraction <= 1.0:
            raise ValueError(f"mixed_long_fraction must be in [0, 1], got {self.mixed_long_fraction}")
        if self.chat_sigma < 0:
            raise ValueError(f"chat_sigma must not be negative, got {self.chat_sigma}")


class TokenizerLike(Protocol):
    """What a vocabulary needs of hetserve.model.tokenizer.Tokenizer."""

    vocab_size: int
    strip_leading_space: bool

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class Vocabulary:
    """Pieces that prompts are strung from, each with its leading space. With a tokenizer every piece is
    one token wherever it stands, so n pieces are n tokens; without one, pieces are words."""

    pieces: tuple[str, ...]
    count: Callable[[str], int]
    exact: bool
    # Whether a prompt drops its first space: SentencePiece writes that space itself (a written one is one
    # token more), while byte-level BPE needs it to keep the first piece one token.
    strip_first_space: bool = True

    def words(self, rng: np.random.Generator, n: int) -> str:
        return "".join(self.pieces[i] for i in rng.integers(len(self.pieces), size=n))

    def prompt(self, text: str) -> str:
        return text[1:] if self.strip_first_space and text.startswith(" ") else text


def word_vocabulary() -> Vocabulary:
    return Vocabulary(tuple(" " + word for word in _WORDS), lambda text: len(text.split()), exact=False)


def tokenizer_vocabulary(tokenizer: TokenizerLike) -> Vocabulary:
    """Single-token words of `tokenizer`, kept only where they encode as themselves after other text."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    anchor = encode("x")
    pieces = []
    for token_id in range(tokenizer.vocab_size):
        piece = tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
        if _WORD_TOKEN.fullmatch(piece) and encode("x" + piece) == anchor + [token_id]:
            pieces.append(piece)
            if len(pieces) == _POOL_SIZE:
                break
    if len(pieces) < 50:
        raise ValueError(f"tokenizer has only {len(pieces)} single-token words; cannot build exact prompts")
    return Vocabulary(tuple(pieces), lambda text: len(encode(text)), exact=True,
                      strip_first_space=tokenizer.strip_leading_space)


def load_vocabulary(tokenizer: str | None) -> Vocabulary:
    """The vocabulary of the model `tokenizer` names, or plain words when it is None."""
    if tokenizer is None:
        return word_vocabulary()
    from hetserve.model.loader import load_tokenizer, resolve_model_path  # imports torch: only when asked

    return tokenizer_vocabulary(load_tokenizer(resolve_model_path(tokenizer)))


def build_requests(config: WorkloadConfig, vocab: Vocabulary) -> list[Request]:
    """The requests of one run, the same for the same config and seed."""
    rng = np.random.default_rng(config.seed)
    return _BUILDERS[config.workload](config, vocab, rng)


def uniform_lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> list[int]:
    low, high = max(1, math.floor(length * (1 - ratio))), math.ceil(length * (1 + ratio))
    return rng.integers(low, high + 1, size=n).tolist()


def lognormal_lengths(rng: np.random.Generator, median: int, sigma: float, n: int) -> list[int]:
    # Clipped so that one draw from the long tail cannot dominate a short run.
    draws = rng.lognormal(math.log(median), sigma, size=n)
    return np.clip(np.rint(draws), 1, 8 * median).astype(int).tolist()


def _request(vocab: Vocabulary, text: str, max_tokens: int) -> Request:
    prompt = vocab.prompt(text)
    return Request(prompt, vocab.count(prompt), max_tokens)


def _fresh_prompts(vocab: Vocabulary, rng: np.random.Generator, inputs: list[int],
                   outputs: list[int]) -> list[Request]:
    return [_request(vocab, vocab.words(rng, n), m) for n, m in zip(inputs, outputs)]


def _outputs(config: WorkloadConfig, rng: np.random.Generator) -> list[int]:
    return uniform_lengths(rng, config.random_output_len, config.random_range_ratio, config.num_prompts)


def _uniform_inputs(input_len: Callable[[WorkloadConfig], int]):
    def build(config: WorkloadConfig, vocab: Vocabulary, rng: np.random.Generator) -> list[Request]:
        inputs = uniform_lengths(rng, input_len(config), config.random_range_ratio, config.num_prompts)
        return _fresh_prompts(vocab, rng, inputs, _outputs(config, rng))
    return build


def _chat(config: WorkloadConfig, vocab: Vocabulary, rng: np.random.Generator) -> list[Request]:
    inputs = lognormal_lengths(rng, config.chat_input_len, config.chat_sigma, config.num_prompts)
    outputs = lognormal_lengths(rng, config.chat_output_len, config.chat_sigma, config.num_prompts)
    return _fresh_prompts(vocab, rng, inputs, outputs)


def _shared_prefix(config: WorkloadConfig, vocab: Vocabulary, rng: np.random.Generator) -> list[Request]:
    prefix = vocab.words(rng, config.prefix_len)
    return [_request(vocab, prefix + vocab.words(rng, config.suffix_len), m) for m in _outputs(config, rng)]


def _mixed(config: WorkloadConfig, vocab: Vocabulary, rng: np.random.Generator) -> list[Request]:
    """Random requests, each long with probability mixed_long_fraction (FastServe's head-of-line case)."""
    short = _BUILDERS["random"](config, vocab, rng)
    is_long = rng.random(config.num_prompts) < config.mixed_long_fraction
    return [_request(vocab, vocab.words(rng, config.long_context_len), config.mixed_long_output_len)
            if long else request for request, long in zip(short, is_long)]


def _jsonl(config: WorkloadConfig, vocab: Vocabulary, rng: np.random.Generator) -> list[Request]:
    entries = islice(cycle(read_jsonl(Path(config.dataset_path))), config.num_prompts)
    return [Request(entry["prompt"], vocab.count(entry["prompt"]),
                    int(entry.get("max_tokens") or config.random_output_len)) for entry in entries]


def read_jsonl(path: Path) -> list[dict]:
    """The entries of a JSONL prompt file; each must hold a string "prompt"."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"cannot read dataset {path}: {error.strerror}") from None
    entries = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        entry = json.loads(text)
        if not (isinstance(entry, dict) and isinstance(entry.get("prompt"), str)):
            raise ValueError(f"dataset {path}, line {number}: expected {{\"prompt\": str, \"max_tokens\": int}}")
        entries.append(entry)
    if not entries:
        raise ValueError(f"dataset {path} holds no prompts")
    return entries


_BUILDERS = {
    "random": _uniform_inputs(lambda config: config.random_input_len),
    "long-context": _uniform_inputs(lambda config: config.long_context_len),
    "chat": _chat,
    "shared-prefix": _shared_prefix,
    "mixed": _mixed,
    "jsonl": _jsonl,
}
