"""Llama-family decoder (Llama 1-3, Mistral, Qwen2) over a flat token batch and a paged KV cache.

A model object holds one pipeline stage: the layers [start, end), plus the embedding on the first
stage and the final norm and LM head on the last."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetserve.model.attention import AttentionMetadata, KVLayerCache, attend, store_kv
from hetserve.model.cpu_kernels import (rms_norm, rms_norm_supported, rope_store, rope_store_supported, silu_mul,
                                        silu_mul_supported, small_linear, small_linear_supported)
from hetserve.model.native_decoder import NativeDecoder
from hetserve.model.spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if rms_norm_supported(x, self.weight):
            return rms_norm(x, self.weight, self.eps)[0]
        return self._normalize(x)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm): the residual stream after a sublayer and the next sublayer's input."""
        if rms_norm_supported(x, self.weight, delta):
            normed, total = rms_norm(x, self.weight, self.eps, delta)
            return total, normed
        total = x + delta
        return total, self._normalize(total)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with decode-sized bf16 products on the CPU on the small_linear kernel."""
    if small_linear_supported(x, weight, bias):
        return small_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def rope_inverse_frequencies(spec: ModelSpec) -> torch.Tensor:
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.inv_freq = rope_inverse_frequencies(spec)
        positions = torch.arange(spec.max_position, dtype=torch.float32)
        cos, sin = _cos_sin(torch.outer(positions, self.inv_freq))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotation:
        """The rotation of a step's tokens, looked up once for all the layers."""
        return Rotation(self.cos[positions].to(dtype), self.sin[positions].to(dtype))

    def cover(self, num_positions: int) -> None:
        """Extend the tables to `num_positions`: a sliding-window stream runs past the model's context.
        Only relative positions reach the attention scores, and those stay within the window; the
        angles of far positions are computed in float64 to stay exact."""
        length = self.cos.shape[0]
        if num_positions <= length:
            return
        positions = torch.arange(length, max(num_positions, 2 * length), dtype=torch.float64)
        cos, sin = _cos_sin(torch.outer(positions, self.inv_freq.double()))
        self.cos = torch.cat([self.cos, cos.to(self.cos.device)])
        self.sin = torch.cat([self.sin, sin.to(self.sin.device)])

    def rotate(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Rotate keys ([..., head_dim], already at their positions) `offset` positions further."""
        self.cover(offset + 1)
        rotated = _rotate(x.float(), self.cos[offset], self.sin[offset])
        return rotated.to(x.dtype)


@dataclass
class Rotation:
    """cos and sin ([T, head_dim]) of a step's token positions."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on [T, heads, head_dim]."""
        return _rotate(x, self.cos[:, None, :], self.sin[:, None, :])


def _cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class TensorShard:
    """One tensor-parallel rank's slice of every layer (Megatron-style): the KV heads
    [kv_heads[0], kv_heads[1]) with their query heads in a column-split qkv_proj and a row-split
    o_proj, and MLP columns [mlp_columns[0], mlp_columns[1]) of gate_up_proj / down_proj. The
    row-split outputs are partial sums that `all_reduce` completes. Slices may be uneven."""

    kv_heads: tuple[int, int]
    mlp_columns: tuple[int, int]
    rank: int = 0

    @classmethod
    def whole(cls, spec: ModelSpec) -> TensorShard:
        return cls((0, spec.num_kv_heads), (0, spec.intermediate_size))

    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    def q_heads(self, spec: ModelSpec) -> tuple[int, int]:
        group = spec.num_heads // spec.num_kv_heads
        return self.kv_heads[0] * group, self.kv_heads[1] * group


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, shard: TensorShard, all_reduce: AllReduce):
        super().__init__()
        q_start, q_end = shard.q_heads(spec)
        self.num_heads, self.num_kv_heads, self.head_dim = q_end - q_start, shard.num_kv_heads(), spec.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # One fused projection: a single matmul reads the activations once.
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = Linear(self.q_size, spec.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor, rotation: Rotation, kv_cache: KVLayerCache, meta: AttentionMetadata
                ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if rope_store_supported(qkv, kv_cache):
            rope_store(qkv, rotation.cos, rotation.sin, meta.slot_mapping, kv_cache, self.num_heads)
            q, k, v = (t.view(tokens, -1, self.head_dim)
                       for t in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        else:
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            # Queries and keys sit side by side: one rotation covers both.
            qk = rotation.apply(qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim))
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
            store_kv(kv_cache, k, v, meta)
        out = attend(q, k, v, kv_cache, meta, self.scale)
        return self.all_reduce(self.o_proj(out.reshape(tokens, self.q_size)))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, shard: TensorShard, all_reduce: AllReduce):
        super().__init__()
        columns = shard.mlp_columns[1] - shard.mlp_columns[0]
        self.gate_up_proj = Linear(spec.hidden_size, 2 * columns, bias=False)
        self.down_proj = Linear(columns, spec.hidden_size, bias=False)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(self.down_proj(silu_and_mul(self.gate_up_proj(x))))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation of the fused gate and up projections: silu(gate) * up."""
    if silu_mul_supported(gate_up):
        return silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, shard: TensorShard, all_reduce: AllReduce):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, shard, all_reduce)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, shard, all_reduce)

    def forward(self, x: torch.Tensor, rotation: Rotation, kv_cache: KVLayerCache, meta: AttentionMetadata
                ) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(self.input_layernorm(x), rotation, kv_cache, meta))
        return x + self.mlp(h)


# HF checkpoint names of the pieces that this model fuses, and where each piece goes.
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, layer_range: tuple[int, int] | None = None,
                 shard: TensorShard | None = None, all_reduce: AllReduce | None = None):
        super().__init__()
        self.spec = spec
        self.shard = shard or TensorShard.whole(spec)
        self.start, self.end = layer_range or (0, spec.num_layers)
        if not 0 <= self.start < self.end <= spec.num_layers:
            raise ValueError(f"layer range [{self.start}, {self.end}) is not inside [0, {spec.num_layers})")
        self.is_first = self.start == 0
        self.is_last = self.end == spec.num_layers
        # Only one rank of the last stage turns hidden states into logits.
        self.has_lm_head = self.is_last and self.shard.rank == 0
        self.rope = RotaryEmbedding(spec)
        self.layers = nn.ModuleList(DecoderLayer(spec, self.shard, all_reduce or _no_reduce)
                                    for _ in range(self.end - self.start))
        if self.is_first:
            self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        if self.has_lm_head:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
            if self.is_first and spec.tie_word_embeddings:
                # One tensor for both: the vocabulary matrix is a small model's largest weight.
                self.lm_head.weight = self.embed_tokens.weight
        self.requires_grad_(False)
        self.native: NativeDecoder | None = None

    def enable_native_layers(self, kv_caches: list[KVLayerCache]) -> None:
        """Run small steps over `kv_caches` through all the layers in one native call where the
        kernels cover them (NativeDecoder). Call once the weights are final: it keeps pointers to them."""
        self.native = NativeDecoder.build(self, kv_caches)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVLayerCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """Token ids [T] on the first stage, hidden states [T, hidden] on later ones."""
        x = self.embed_tokens(inputs) if self.is_first else inputs
        rotation = self.rope.at(positions, x.dtype)
        native = self.native if self.native is not None and kv_caches is self.native.kv_caches else None
        hidden = None if native is None else native.forward(x, rotation.cos, rotation.sin, meta)
        if hidden is None:
            hidden = x
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden = layer(hidden, rotation, kv_cache, meta)
        return self.norm(hidden) if self.has_lm_head else hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # -- weights -------------------------------------------------------------------------------

    def wants_weight(self, name: str) -> bool:
        """Whether this stage needs the checkpoint tensor `name` (so others are never read)."""
        match = _LAYER_NAME.fullmatch(name)
        if match:
            return self.start <= int(match.group(1)) < self.end
        if name == "model.embed_tokens.weight":
            return self.is_first or (self.has_lm_head and self.spec.tie_word_embeddings)
        return self.has_lm_head and name in ("model.norm.weight", "lm_head.weight")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        pending: dict[str, list[torch.Tensor | None]] = {}
        loaded = set()
        slices = self._shard_slices()
        for name, tensor in weights:
            tensor = self._shard_slice(name, tensor, slices)
            for target in self._targets(name):
                param_name, part = target
                if part is None:
                    params[param_name].copy_(tensor)
                    loaded.add(param_name)
                    continue
                pieces = pending.setdefault(param_name, [None] * (3 if "qkv" in param_name else 2))
                pieces[part] = tensor
                if all(p is not None for p in pieces):
                    params[param_name].copy_(torch.cat(pieces, dim=0))
                    loaded.add(param_name)
                    del pending[param_name]
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))

    def _shard_slices(self) -> dict[str, tuple[int, int, int]]:
        """(dim, start, end) of this rank's rows (column-split projections) or columns (row-split
        ones), by projection name; empty when the rank holds whole layers."""
        if self.shard == TensorShard.whole(self.spec):
            return {}
        head_dim = self.spec.head_dim
        q_start, q_end = self.shard.q_heads(self.spec)
        kv_start, kv_end = self.shard.kv_heads
        return {
            "q_proj": (0, q_start * head_dim, q_end * head_dim),
            "k_proj": (0, kv_start * head_dim, kv_end * head_dim),
            "v_proj": (0, kv_start * head_dim, kv_end * head_dim),
            "o_proj": (1, q_start * head_dim, q_end * head_dim),
            "gate_proj": (0, *self.shard.mlp_columns),
            "up_proj": (0, *self.shard.mlp_columns),
            "down_proj": (1, *self.shard.mlp_columns),
        }

    def _shard_slice(self, name: str, tensor: torch.Tensor, slices: dict[str, tuple[int, int, int]]
                     ) -> torch.Tensor:
        match = _LAYER_NAME.fullmatch(name)
        proj = match.group(2).rsplit(".", 2)[-2] if match else None
        if proj not in slices:
            return tensor
        dim, start, end = slices[proj]
        return tensor.narrow(dim, start, end - start)

    def _targets(self, name: str) -> list[tuple[str, int | None]]:
        """(parameter name, part of a fused parameter or None) for a checkpoint tensor name."""
        if name == "model.embed_tokens.weight":
            if self.is_first:
                return [("embed_tokens.weight", None)]  # the LM head shares it when tied
            return [("lm_head.weight", None)] if self.has_lm_head and self.spec.tie_word_embeddings else []
        if name in ("model.norm.weight", "lm_head.weight"):
            return [(name.removeprefix("model."), None)] if self.has_lm_head else []
        match = _LAYER_NAME.fullmatch(name)
        if not match or not self.start <= int(match.group(1)) < self.end:
            return []
        prefix = f"layers.{int(match.group(1)) - self.start}."
        module, _, leaf = match.group(2).rpartition(".")
        parent, _, proj = module.rpartition(".")
        if proj in _FUSED:
            fused, part = _FUSED[proj]
            return [(f"{prefix}{parent}.{fused}.{leaf}", part)]
        return [(prefix + match.group(2), None)]
