"""Engine configuration: dataclasses validated once at construction, no I/O, no torch.

Each field's `help` metadata becomes its command-line flag's help text (see hetserve.cli)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int | None) -> int | None:
    """Bytes from "2GiB", "512MB", "1e9" or an int; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 2GiB, 512MB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


# Host RAM is shared with everything else on the machine; like vLLM's CPU backend, a CPU worker takes
# at most this much KV cache by default (the worker and the simulator both size caches by it).
CPU_DEFAULT_KV_CACHE_CAP = 4 * 2**30


KV_CACHE_DTYPES = ("auto", "int8", "fp8")
INT8_KV_SCALE_BYTES = 4
"""An int8 KV cache keeps one float32 scale per token, KV head and K or V."""


def kv_bytes_per_token_head(head_dim: int, model_dtype_bytes: int, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's K and V take for one KV head in one layer, scales included."""
    if kv_cache_dtype == "auto":
        return 2 * head_dim * model_dtype_bytes
    if kv_cache_dtype == "int8":
        return 2 * (head_dim + INT8_KV_SCALE_BYTES)
    return 2 * head_dim  # fp8


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class ModelConfig:
    model: str | None = field(**_help(
        "Model: a .gguf file, a Hugging Face directory (config.json + *.safetensors), or empty "
        "for the packaged SmolLM2-135M-Instruct.", default=None))
    dtype: str = field(**_help(
        "Weights and activations dtype: auto (bfloat16 on GPUs and on CPUs with native bf16, "
        "else float32), bfloat16, float16 or float32.", default="auto"))
    max_model_len: int | None = field(**_help(
        "Longest sequence (prompt + output) in tokens; default: the model's context length.",
        default=None))
    chat_template: str | None = field(**_help(
        "A Jinja chat template (file path or the template itself) replacing the model's.",
        default=None))
    quantization: str | None = field(**_help(
        "Weight-only quantization of the decoder layers' matmuls: int8 (per output channel) or int4 "
        "(round to nearest in groups of 128 along the input, or the largest of 64/32 that divides it; "
        "groups of 32 for GGUF files, aligned with their 4-bit blocks). Either way the LM head "
        "becomes int8 per vocabulary row. auto (the default): int4 for a GGUF whose layers are "
        "stored in 4-bit blocks, on a CPU whose byte dot-product kernels run them (bfloat16 with "
        "AVX512-VNNI), as llama.cpp keeps them; else none.",
        default="auto"))

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.quantization == "none":
            self.quantization = None
        if self.quantization not in (None, "auto", "int8", "int4"):
            raise ValueError(f"quantization must be auto, none, int8 or int4, got {self.quantization!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass
class CacheConfig:
    block_size: int = field(**_help("Tokens per KV-cache block.", default=16))
    kv_cache_memory: int | str | None = field(**_help(
        "Bytes for the KV cache (e.g. 2GiB); default: kv_cache_memory_fraction of free memory.",
        default=None))
    kv_cache_memory_fraction: float = field(**_help(
        "Fraction of the device's free memory (after weights) given to the KV cache when "
        "kv_cache_memory is not set (on CPU, at most 4 GiB).", default=0.25))
    num_kv_blocks: int | None = field(**_help(
        "Number of KV blocks, overriding the sizing from memory (to pin capacity, or in tests).",
        default=None))
    enable_prefix_caching: bool = field(**_help(
        "Reuse the KV of prompt prefixes shared between requests.", default=True))
    kv_cache_dtype: str = field(**_help(
        "KV-cache storage: auto (the model dtype), int8 (symmetric, a float32 scale per token and KV "
        "head, so new tokens never requantize old ones: about 1.9x the tokens of bfloat16 in the same "
        "memory) or fp8 (float8 e4m3, saturating at +-448: 2x; on CUDA needs compute capability 8.9+, "
        "on CPU a storage format that attention reads back in the model dtype).", default="auto"))
    sliding_window: int | None = field(**_help(
        "StreamingLLM: keep only the attention sinks and the last this many tokens of each sequence "
        "in the KV cache (in whole blocks), so a stream runs far past max_model_len in constant memory "
        "(prompts and max_tokens may then exceed it; max_tokens defaults to it). Turns off prefix caching.",
        default=None))
    attention_sinks: int = field(**_help(
        "StreamingLLM: the first tokens of each sequence, kept for good beside the sliding window "
        "(rounded up to whole blocks).", default=4))
    swap_space: int | str = field(**_help(
        "Host RAM per worker for the KV of preempted requests (e.g. 4GiB; 0 turns swapping off): a "
        "request swapped out resumes where it stopped instead of recomputing its tokens.", default="1GiB"))

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        self.swap_space = parse_size(self.swap_space)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto, int8 or fp8, got {self.kv_cache_dtype!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must not be negative, got {self.swap_space}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.sliding_window is not None and self.sliding_window < self.block_size:
            raise ValueError(f"sliding_window must be at least block_size ({self.block_size}), got {self.sliding_window}")
        if self.attention_sinks < 0:
            raise ValueError(f"attention_sinks must not be negative, got {self.attention_sinks}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = field(**_help("Most requests running in one step.", default=128))
    max_num_batched_tokens: int = field(**_help(
        "Most tokens computed in one step; longer prompts are prefilled in chunks.", default=2048))
    scheduling_policy: str = field(**_help(
        "Who runs first when not everyone fits: fcfs (arrival order), priority (the request's priority "
        "field, smaller first, then arrival) or mlfq (FastServe's skip-join multi-level feedback queue: "
        "requests move down a level as they generate, so short requests overtake long ones).",
        default="fcfs"))
    mlfq_num_levels: int = field(**_help("mlfq: number of queue levels.", default=4))
    mlfq_quantum: int = field(**_help(
        "mlfq: output tokens a request may generate on the top level before it moves down; each level "
        "below doubles it.", default=32))
    mlfq_starvation_steps: int = field(**_help(
        "mlfq: steps a request may wait before it returns to the top level.", default=500))
    preemption_mode: str = field(**_help(
        "What a preempted request's KV becomes: swap (copied to host RAM, copied back on resume), "
        "recompute (dropped, recomputed on resume), or auto (whichever the measured copy and prefill "
        "speeds make cheaper, while the swap space has room).", default="auto"))

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority", "mlfq"):
            raise ValueError(f"scheduling_policy must be fcfs, priority or mlfq, got {self.scheduling_policy!r}")
        if self.preemption_mode not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption_mode must be auto, swap or recompute, got {self.preemption_mode!r}")
        if min(self.mlfq_num_levels, self.mlfq_quantum, self.mlfq_starvation_steps) < 1:
            raise ValueError("mlfq_num_levels, mlfq_quantum and mlfq_starvation_steps must be positive")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")


@dataclass
class DeviceConfig:
    device: str = field(**_help("Device to run on: auto, cpu, cuda, cuda:N.", default="auto"))

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class ParallelConfig:
    pipeline_parallel_size: int = field(**_help(
        "Pipeline stages: the layers are split into this many consecutive ranges.", default=1))
    tensor_parallel_size: int = field(**_help(
        "Tensor-parallel ranks per stage (attention heads and MLP columns split between them).",
        default=1))
    pipeline_layer_split: str | None = field(**_help(
        "Layers per pipeline stage, comma-separated (e.g. 12,18 for an uneven split); "
        "default: as even as possible.", default=None))
    devices: str | None = field(**_help(
        "Device of each worker, stage by stage, comma-separated (e.g. cuda:0,cpu); "
        "default: --device for all.", default=None))
    plan: str | None = field(**_help(
        "A plan JSON file (stages with layer ranges, devices, KV heads and KV memory per worker, e.g. from "
        "`hetserve plan --out`) replacing the shorthands above, or auto: plan from this host's measured "
        "device profile (the default when the host has several GPUs and no placement is given).",
        default=None))
    distributed_executor_backend: str = field(**_help(
        "Where workers run: auto (in this process for one worker, else one process each), "
        "local (all in this process; no tensor parallelism), mp (one process per worker) "
        "or ray (Ray actors on a Ray cluster).", default="auto"))
    worker_timeout: float = field(**_help(
        "Seconds a step may take before its workers are declared hung and the engine fails.",
        default=300.0))

    def __post_init__(self) -> None:
        if self.pipeline_parallel_size < 1 or self.tensor_parallel_size < 1:
            raise ValueError("pipeline_parallel_size and tensor_parallel_size must be at least 1")
        if self.distributed_executor_backend not in ("auto", "local", "mp", "ray"):
            raise ValueError("distributed_executor_backend must be auto, local, mp or ray, got "
                             f"{self.distributed_executor_backend!r}")
        if self.worker_timeout <= 0:
            raise ValueError(f"worker_timeout must be positive, got {self.worker_timeout}")
        if self.plan is not None and (self.pipeline_parallel_size > 1 or self.tensor_parallel_size > 1
                                      or self.pipeline_layer_split or self.devices):
            raise ValueError("give either plan or the parallel sizes / layer split / devices, not both")


@dataclass
class OffloadConfig:
    memory_budget: int | str | None = field(**_help(
        "Device bytes for weights (e.g. 2GiB): decoder layers beyond it live in host RAM (up to "
        "cpu_offload_gb) or on disk (disk_offload_dir) and stream in layer by layer, the next ones "
        "prefetched while one computes (FlexGen); the streamed layers in flight count against it.",
        default=None))
    cpu_offload_gb: float = field(**_help(
        "GiB of decoder-layer weights kept in pinned host RAM instead of on the GPU (vLLM's flag); "
        "with memory_budget, the most host RAM the layers beyond it may take. On a CPU device host RAM "
        "is device memory, so it changes nothing there.", default=0.0))
    disk_offload_dir: str | None = field(**_help(
        "Directory for decoder layers that fit neither the memory budget nor cpu_offload_gb: written "
        "once per model as per-layer safetensors files (reused on restart) and memory-mapped.",
        default=None))
    offload_prefetch_window: int = field(**_help(
        "Streamed layers loaded ahead of the one computing.", default=1))

    def __post_init__(self) -> None:
        self.memory_budget = parse_size(self.memory_budget)
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {self.memory_budget}")
        if not self.cpu_offload_gb >= 0:
            raise ValueError(f"cpu_offload_gb must not be negative, got {self.cpu_offload_gb}")
        if self.offload_prefetch_window < 1:
            raise ValueError(f"offload_prefetch_window must be at least 1, got {self.offload_prefetch_window}")
        if self.disk_offload_dir is not None and not self.disk_offload_dir.strip():
            raise ValueError("disk_offload_dir must not be empty")

    @property
    def enabled(self) -> bool:
        return self.memory_budget is not None or self.cpu_offload_gb > 0

    @property
    def cpu_offload_bytes(self) -> int:
        return int(self.cpu_offload_gb * 2**30)


@dataclass
class ServerConfig:
    host: str = field(**_help("Address to listen on.", default="127.0.0.1"))
    port: int = field(**_help("Port to listen on.", default=8000))
    served_model_name: str | None = field(**_help(
        "Model name in the API (the `model` field); default: the model file or directory name.",
        default=None))
    api_key: str | None = field(**_help(
        "Require `Authorization: Bearer KEY` on the API (also from env HETSERVE_API_KEY).",
        default=None))
    max_queue_len: int | None = field(**_help(
        "Most requests waiting to run; beyond it requests get 503 with Retry-After.", default=1024))
    max_request_body_bytes: int = field(**_help(
        "Largest request body accepted; larger ones get 413.", default=8 * 2**20))
    disable_log_requests: bool = field(**_help("Do not log each request.", default=False))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue_len is not None and self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be positive, got {self.max_queue_len}")
        if self.max_request_body_bytes < 1024:
            raise ValueError(f"max_request_body_bytes must be at least 1024, got {self.max_request_body_bytes}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    seed: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments (`max_num_seqs=8`), as the CLI and LLM() pass them."""
        parts = {}
        for part_field in fields(cls):
            if part_field.name == "seed":
                continue
            part_cls = part_field.default_factory
            names = {f.name for f in fields(part_cls)}
            parts[part_field.name] = part_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        seed = kwargs.pop("seed", 0)
        if kwargs:
            raise ValueError(f"unknown engine argument(s): {', '.join(sorted(kwargs))}")
        return cls(**parts, seed=seed)


@dataclass
class QuantizeConfig:
    model: str | None = field(**_help(
        "Model to quantize: anything `serve` takes (a .gguf file, a Hugging Face directory, or empty for "
        "the packaged SmolLM2-135M-Instruct).", default=None))
    output: str | None = field(**_help(
        "Directory to write the int4 checkpoint to (must not exist or be empty); `serve --model DIR` loads it.",
        default=None))
    method: str = field(**_help(
        "awq (activation-aware scales searched on calibration text, then round to nearest) or rtn "
        "(round to nearest only).", default="awq"))
    group_size: int = field(**_help(
        "Input columns sharing one int4 scale and minimum: 128, 64 or 32 (a projection whose input it "
        "does not divide takes the largest of these that does).", default=128))
    calibration_tokens: int = field(**_help(
        "awq: tokens of calibration text (Python's pydoc topics) the scales are searched on.", default=4096))

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output is required: the directory to write the int4 checkpoint to")
        if self.method not in ("awq", "rtn"):
            raise ValueError(f"method must be awq or rtn, got {self.method!r}")
        if self.group_size not in (128, 64, 32):
            raise ValueError(f"group_size must be 128, 64 or 32, got {self.group_size}")
        if self.calibration_tokens < 1:
            raise ValueError(f"calibration_tokens must be positive, got {self.calibration_tokens}")
