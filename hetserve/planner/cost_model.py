"""Cost and memory model: how long a step takes on a stage of devices and how much memory a layer
range needs, as pure functions of a model's shapes and a device profile.

Times come from measured linear timings at the model's shapes where the profile has them (scaled
for tensor-parallel slices), else from the roofline: max(FLOPs / peak, bytes / bandwidth)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

from hetserve.config import kv_bytes_per_token_head
from hetserve.model.spec import ModelSpec
from hetserve.planner.profile import DTYPE_BYTES, DeviceProfile, Link, LinearTiming

ACTIVATION_DTYPE_BYTES = 2
QUANTIZED_DTYPES = ("int8", "int4")


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs; `weight_dtype` may be a quantized type (int8, int4)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = True
    dtype: str = "bfloat16"
    """Compute dtype, and the KV cache's where kv_cache_dtype is auto."""
    weight_dtype: str | None = None
    """Stored weight dtype; default: `dtype`."""
    kv_cache_dtype: str = "auto"
    """KV-cache storage, as --kv-cache-dtype: auto, int8 (with its scales) or fp8."""

    @classmethod
    def from_spec(cls, spec: ModelSpec, dtype: str = "bfloat16", weight_dtype: str | None = None,
                  kv_cache_dtype: str = "auto") -> ModelShape:
        return cls(spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
                   spec.head_dim, spec.vocab_size, spec.tie_word_embeddings, dtype, weight_dtype, kv_cache_dtype)

    def linears(self) -> tuple[tuple[int, int], ...]:
        """(out_features, in_features) of one decoder layer's matmuls: qkv, o, gate_up, down."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return ((q + 2 * kv, self.hidden_size), (self.hidden_size, q),
                (2 * self.intermediate_size, self.hidden_size), (self.hidden_size, self.intermediate_size))

    @property
    def weight_bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.weight_dtype or self.dtype]

    @property
    def layer_params(self) -> int:
        return sum(out * inp for out, inp in self.linears()) + 2 * self.hidden_size

    def layer_weight_bytes(self) -> float:
        return self.layer_params * self.weight_bytes_per_param

    def embedding_bytes(self) -> float:
        """One vocabulary matrix (the embedding, or the LM head) in the compute dtype."""
        return self.vocab_size * self.hidden_size * DTYPE_BYTES[self.dtype]

    @property
    def lm_head_bytes_per_param(self) -> float:
        """The quantized modes keep the LM head in int8 (quantize_lm_head), else it is in the compute dtype."""
        return DTYPE_BYTES["int8"] if self.weight_dtype in QUANTIZED_DTYPES else DTYPE_BYTES[self.dtype]

    def lm_head_bytes(self, beside_embedding: bool) -> float:
        """The LM head's own bytes; none where it is the embedding's matrix (tied and unquantized, on a
        stage that holds the embedding)."""
        if beside_embedding and self.tie_word_embeddings and self.weight_dtype not in QUANTIZED_DTYPES:
            return 0.0
        return self.vocab_size * self.hidden_size * self.lm_head_bytes_per_param

    def kv_bytes_per_token(self, kv_heads: int | None = None) -> float:
        """KV-cache bytes one token takes in one layer for `kv_heads` heads (default: all)."""
        heads = self.num_kv_heads if kv_heads is None else kv_heads
        return heads * kv_bytes_per_token_head(self.head_dim, DTYPE_BYTES[self.dtype], self.kv_cache_dtype)

    def activation_bytes(self, max_tokens: int) -> float:
        """Peak scratch memory of one forward over `max_tokens` tokens (the widest intermediate,
        residual stream and float32 logits)."""
        widest = max(out for out, _ in self.linears())
        return max_tokens * ((widest + 3 * self.hidden_size) * ACTIVATION_DTYPE_BYTES + 4 * self.vocab_size)

    @property
    def total_weight_bytes(self) -> float:
        return (self.num_layers * self.layer_weight_bytes() + self.embedding_bytes()
                + self.lm_head_bytes(beside_embedding=True))


@dataclass(frozen=True)
class StepShape:
    """The work of one engine step, as the cost model sees it."""

    tokens: int
    """Query tokens computed (prefill chunks plus decode tokens)."""
    sampled: int
    """Sequences that produce logits this step."""
    decode_kv_tokens: int = 0
    """Sum over single-token (decode) requests of the context they read."""
    prefill_pairs: int = 0
    """Sum over multi-token chunks of causal (query, key) pairs."""

    @classmethod
    def from_chunks(cls, chunks: Iterable[tuple[int, int, bool]]) -> StepShape:
        """From (start position, new tokens, samples) per scheduled request."""
        tokens = sampled = decode_kv = pairs = 0
        for start, num_new, sample in chunks:
            tokens += num_new
            sampled += sample
            if num_new == 1:
                decode_kv += start + 1
            else:
                pairs += num_new * start + num_new * (num_new + 1) // 2
        return cls(tokens, sampled, decode_kv, pairs)

    @classmethod
    def decode(cls, batch: int, context: int) -> StepShape:
        return cls(batch, batch, batch * context, 0)

    @classmethod
    def prefill(cls, prompt_len: int, count: int = 1) -> StepShape:
        return cls(prompt_len * count, count, 0, count * prompt_len * (prompt_len + 1) // 2)


@dataclass(frozen=True)
class Rank:
    """One tensor-parallel rank of a stage: its device, KV heads and CPU threads."""

    device: DeviceProfile
    kv_heads: int
    threads: int | None = None
    """CPU threads of this worker; None: all the device's cores."""


def pick_dtype(device: DeviceProfile, requested: str) -> str:
    """`requested` if the device computes it, else the closest it does (float16 for bfloat16)."""
    for dtype in (requested, "float16", "bfloat16", "float32"):
        if dtype in device.flops:
            return dtype
    return next(iter(device.flops))


class CostModel:
    def __init__(self, shape: ModelShape):
        self.shape = shape
        # Matmul time of one layer by (device, KV heads, tokens): a simulation asks for the same few
        # token counts on the same devices at every step of every stage. The device itself is kept
        # in the value so that its id cannot be reused by another object while cached.
        self._matmul_cache: dict[tuple[int, int, int], tuple[DeviceProfile, float]] = {}

    # -- time ----------------------------------------------------------------------------------

    def linear_time(self, device: DeviceProfile, tokens: int, out_features: int, in_features: int,
                    fraction: float = 1.0, bytes_per_param: float | None = None) -> float:
        """y = x @ W.T for `fraction` of W's rows or columns (a tensor-parallel slice), W stored in
        `bytes_per_param` (default: the layers' weight dtype)."""
        if tokens <= 0:
            return 0.0
        dtype = pick_dtype(device, self.shape.dtype)
        measured = [t for t in device.linear.get(dtype, ())
                    if (t.out_features, t.in_features) == (out_features, in_features)]
        if measured:
            return interpolate(measured, tokens) * fraction
        out_features = out_features * fraction
        flops = 2.0 * tokens * out_features * in_features
        weights = out_features * in_features * (bytes_per_param or self.shape.weight_bytes_per_param)
        activations = tokens * (out_features + in_features) * ACTIVATION_DTYPE_BYTES
        return max(flops / device.flops[dtype], (weights + activations) / device.memory_bandwidth)

    def attention_time(self, device: DeviceProfile, step: StepShape, kv_heads: int) -> float:
        """One layer's attention over the KV of `kv_heads` heads (and their query heads)."""
        shape = self.shape
        decode_bytes = step.decode_kv_tokens * shape.kv_bytes_per_token(kv_heads)
        query_heads = kv_heads * shape.num_heads // shape.num_kv_heads
        prefill_flops = 4.0 * step.prefill_pairs * query_heads * shape.head_dim
        dtype = pick_dtype(device, shape.dtype)
        flops = device.attention_flops.get(dtype) or device.flops[dtype]
        return decode_bytes / (device.attention_bandwidth or device.memory_bandwidth) + prefill_flops / flops

    def layer_time(self, rank: Rank, step: StepShape) -> float:
        """One decoder layer on one rank: its matmul slices, attention and fixed costs."""
        compute = self.layer_matmul_time(rank.device, rank.kv_heads, step.tokens)
        compute += self.attention_time(rank.device, step, rank.kv_heads)
        compute += rank.device.token_overhead * step.tokens
        return compute * self._slowdown(rank) + rank.device.layer_overhead

    def layer_matmul_time(self, device: DeviceProfile, kv_heads: int, tokens: int) -> float:
        """The four matmuls of one layer on the slice holding `kv_heads` heads."""
        key = (id(device), kv_heads, tokens)
        cached = self._matmul_cache.get(key)
        if cached is None:
            fraction = kv_heads / self.shape.num_kv_heads
            time = sum(self.linear_time(device, tokens, out, inp, fraction) for out, inp in self.shape.linears())
            cached = self._matmul_cache[key] = (device, time)
        return cached[1]

    def lm_head_time(self, rank: Rank, step: StepShape) -> float:
        shape = self.shape
        return self.linear_time(rank.device, step.sampled, shape.vocab_size, shape.hidden_size,
                                bytes_per_param=shape.lm_head_bytes_per_param) * self._slowdown(rank)

    def stage_time(self, ranks: tuple[Rank, ...], num_layers: int, step: StepShape, is_last: bool,
                   tp_link: Link | None = None) -> float:
        """One step through a stage: its slowest rank's layers, the two all-reduces per layer between
        ranks, and on the last stage the LM head (on rank 0)."""
        per_rank = [num_layers * self.layer_time(rank, step) + rank.device.step_overhead for rank in ranks]
        if is_last:
            per_rank[0] += self.lm_head_time(ranks[0], step)
        time = max(per_rank)
        if len(ranks) > 1:
            if tp_link is None:
                raise ValueError("a tensor-parallel stage needs the link between its ranks")
            time += num_layers * 2 * self.all_reduce_time(tp_link, len(ranks), step.tokens)
        return time

    def all_reduce_time(self, link: Link, world: int, tokens: int) -> float:
        """Ring all-reduce of [tokens, hidden] activations over `world` ranks."""
        num_bytes = tokens * self.shape.hidden_size * ACTIVATION_DTYPE_BYTES
        return 2 * (world - 1) * (link.latency + num_bytes / world / link.bandwidth)

    def activation_transfer_time(self, link: Link, tokens: int) -> float:
        """Hidden states of one step from one stage to the next."""
        return link.transfer_time(tokens * self.shape.hidden_size * ACTIVATION_DTYPE_BYTES)

    # -- memory --------------------------------------------------------------------------------

    def stage_weight_bytes(self, num_layers: int, kv_heads: int, is_first: bool, is_last: bool,
                           tp_rank: int = 0) -> float:
        """Weights one rank of a stage holds: its slice of the layers, plus the embedding on the
        first stage and the LM head on the last stage's rank 0 (both whole, not sliced)."""
        shape = self.shape
        fraction = kv_heads / shape.num_kv_heads
        weights = num_layers * shape.layer_weight_bytes() * fraction
        if is_first:
            weights += shape.embedding_bytes()
        if is_last and tp_rank == 0:
            weights += shape.lm_head_bytes(beside_embedding=is_first)
        return weights

    def kv_tokens_capacity(self, free_bytes: float, num_layers: int, kv_heads: int) -> int:
        """Tokens of KV cache that fit in `free_bytes` for a rank holding these layers and heads."""
        per_token = num_layers * self.shape.kv_bytes_per_token(kv_heads)
        return max(0, int(free_bytes // per_token))

    def _slowdown(self, rank: Rank) -> float:
        return rank.device.slowdown(rank.threads) if rank.threads is not None else 1.0


def interpolate(timings: list[LinearTiming], tokens: int) -> float:
    """Piecewise-linear in tokens between measured points; flat below the smallest, proportional
    beyond the largest (past it, matmuls are compute bound)."""
    points = sorted((t.tokens, t.seconds) for t in timings)
    xs = [x for x, _ in points]
    if tokens <= xs[0]:
        return points[0][1]
    if tokens >= xs[-1]:
        return points[-1][1] * tokens / xs[-1]
    i = bisect_left(xs, tokens)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
