"""int4 checkpoints: a Hugging Face style directory that `serve` loads without quantizing again.

config.json describes the model and carries
`"quantization_config": {"quant_method": "awq" | "rtn", "bits": 4, "group_size": G, "format": "hetserve-int4"}`.
model.safetensors holds, per decoder projection P (Hugging Face names, e.g.
model.layers.0.self_attn.q_proj), `P.qweight`: uint8 [out, in / 2], two 4-bit values a byte, the
even input column in the low nibble; `P.scales` and `P.mins`: float32 [out, in / g], so that a weight
is value * scale + min. The group g is G, or where G does not divide a projection's input the
largest of 64 and 32 that does (int4_group_size); the scales' shape tells it. Every other tensor (embeddings, norms, LM head, biases) is stored in float.
The portable layout is packed for the device's kernels at load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hetserve.model.llama import DecoderLayer, LlamaForCausalLM, TensorShard
from hetserve.model.loader import iter_weights
from hetserve.model.quantization import INT4_GROUP_SIZES, Int4Linear, int4_group_size, int4_quantize_groups

FORMAT = "hetserve-int4"
METHODS = ("awq", "rtn")
_INT4_SUFFIXES = (".qweight", ".scales", ".mins")


@dataclass(frozen=True)
class Int4CheckpointConfig:
    method: str
    group_size: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"int4 checkpoint method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                             f"got {self.group_size}")

    def to_json(self) -> dict:
        return {"quant_method": self.method, "bits": 4, "group_size": self.group_size, "zero_point": True,
                "format": FORMAT}

    @classmethod
    def from_json(cls, config: dict) -> Int4CheckpointConfig:
        if config.get("format") != FORMAT or config.get("bits") != 4:
            raise ValueError(f"config.json quantization_config {config} is not supported (only hetserve's own "
                             f"int4 checkpoints, format {FORMAT!r}, from `hetserve quantize`)")
        return cls(config.get("quant_method"), int(config.get("group_size", 0)))


def read_int4_config(path: Path) -> Int4CheckpointConfig | None:
    """The int4 quantization of the model at `path`, None for a model in float (or a GGUF file)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    quantization = json.loads(config_file.read_text()).get("quantization_config")
    return None if quantization is None else Int4CheckpointConfig.from_json(quantization)


def is_int4_tensor(name: str) -> bool:
    return name.endswith(_INT4_SUFFIXES)


def _pieces(layer: DecoderLayer) -> dict[str, list[tuple[str, int]]]:
    """Each of the layer's linears (fused in the model) -> its checkpoint projections with their rows,
    in the order the model concatenates them."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, columns = attn.o_proj.out_features, mlp.down_proj.in_features
    return {
        "self_attn.qkv_proj": [("self_attn.q_proj", attn.q_size), ("self_attn.k_proj", attn.kv_size),
                               ("self_attn.v_proj", attn.kv_size)],
        "self_attn.o_proj": [("self_attn.o_proj", hidden)],
        "mlp.gate_up_proj": [("mlp.gate_proj", columns), ("mlp.up_proj", columns)],
        "mlp.down_proj": [("mlp.down_proj", hidden)],
    }


# --------------------------------------------------------------------------- saving


def int4_checkpoint_tensors(model: LlamaForCausalLM, group_size: int) -> dict[str, torch.Tensor]:
    """Every tensor of a whole float model in checkpoint names, its layers' linears rounded to int4
    (as Int4Linear.from_linear rounds them)."""
    if not (model.is_first and model.is_last) or model.shard != TensorShard.whole(model.spec):
        raise ValueError("saving an int4 checkpoint needs the whole model in one piece")
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not model.spec.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{index}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}{norm}.weight"] = layer.get_submodule(norm).weight
        for fused, pieces in _pieces(layer).items():
            tensors |= _int4_pieces(layer.get_submodule(fused), prefix, pieces, group_size)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def _int4_pieces(linear: nn.Linear, prefix: str, pieces: list[tuple[str, int]], group_size: int
                 ) -> dict[str, torch.Tensor]:
    group_size = int4_group_size(linear.in_features, group_size)
    values, scales, mins = int4_quantize_groups(linear.weight.detach().float(), group_size)
    sizes = [rows for _, rows in pieces]
    parts = zip(pieces, values.split(sizes), scales.split(sizes), mins.split(sizes),
                linear.bias.split(sizes) if linear.bias is not None else [None] * len(pieces))
    tensors = {}
    for (name, _), piece_values, piece_scales, piece_mins, bias in parts:
        tensors |= {f"{prefix}{name}.qweight": pack_int4(piece_values), f"{prefix}{name}.scales": piece_scales,
                    f"{prefix}{name}.mins": piece_mins}
        if bias is not None:
            tensors[f"{prefix}{name}.bias"] = bias
    return tensors


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[out, in] values in [0, 15] -> uint8 [out, in / 2], even columns in the low nibbles."""
    values = values.to(torch.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4, as int32."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


# --------------------------------------------------------------------------- loading


def load_int4_linears(model: LlamaForCausalLM, path: Path, config: Int4CheckpointConfig,
                      device: torch.device, dtype: torch.dtype) -> None:
    """Replace the linears of `model`'s layers (still on the meta device) by Int4Linear built from the
    checkpoint's stored values, on `device`; their biases stay parameters for load_weights."""
    if model.shard != TensorShard.whole(model.spec):
        raise ValueError("int4 checkpoints do not support tensor parallelism; use pipeline parallelism")
    stored = dict(iter_weights(path, model.spec, lambda name: is_int4_tensor(name) and model.wants_weight(name)))
    for index, layer in enumerate(model.layers):
        prefix = f"model.layers.{model.start + index}."
        for fused, pieces in _pieces(layer).items():
            parent_name, _, leaf = fused.rpartition(".")
            linear = layer.get_submodule(fused)
            int4 = _stored_int4(stored, prefix, pieces, linear, device, dtype)
            setattr(layer.get_submodule(parent_name), leaf, int4)


def _stored_int4(stored: dict[str, torch.Tensor], prefix: str, pieces: list[tuple[str, int]], linear: nn.Linear,
                 device: torch.device, dtype: torch.dtype) -> Int4Linear:
    try:
        values = torch.cat([unpack_int4(stored[f"{prefix}{name}.qweight"]) for name, _ in pieces])
        scales = torch.cat([stored[f"{prefix}{name}.scales"] for name, _ in pieces]).float()
        mins = torch.cat([stored[f"{prefix}{name}.mins"] for name, _ in pieces]).float()
    except KeyError as missing:
        raise ValueError(f"int4 checkpoint lacks {missing.args[0]}") from None
    # The group size is the checkpoint's: as many input columns as there are per scale.
    group_size = linear.in_features // max(scales.shape[-1], 1)
    groups = (linear.out_features, linear.in_features // group_size)
    if (values.shape != linear.weight.shape or scales.shape != groups or mins.shape != groups
            or group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"int4 checkpoint tensors of {prefix}{pieces[0][0]}... have shapes {tuple(values.shape)}, "
                         f"{tuple(scales.shape)}, expected {tuple(linear.weight.shape)} and [out, in / group] "
                         f"with a group of {', '.join(map(str, INT4_GROUP_SIZES))}")
    return Int4Linear(values.to(device), scales.to(device), mins.to(device), group_size, dtype, linear.bias)
