"""A Worker owns a device, a range of layers with their weights, and their share of the KV cache.

It turns a SchedulerOutput into tensors, runs its model stage and, on the last stage, samples.
Every executor (in-process, multiprocess, Ray) drives this same class."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from hetserve.config import CPU_DEFAULT_KV_CACHE_CAP, CacheConfig, EngineConfig, kv_bytes_per_token_head
from hetserve.core.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput
from hetserve.model.attention import KVLayerCache, allocate_kv_cache, kv_cache_shape, rewrite_block
from hetserve.model.int4_checkpoint import (Int4CheckpointConfig, is_int4_tensor, load_int4_linears,
                                              read_int4_config)
from hetserve.model.llama import AllReduce, LlamaForCausalLM, RotaryEmbedding, TensorShard
from hetserve.model.loader import iter_weights
from hetserve.model.offload import LayerOffload, offload_layers
from hetserve.model.sampler import Sampler, SamplingState, make_generator, token_logprobs
from hetserve.model.quantization import (GGUF_BLOCK_SIZE, QUANTIZATIONS, quantize_layers, quantize_lm_head,
                                         resolve_quantization)
from hetserve.model.spec import ModelSpec
from hetserve.worker.device import available_memory, resolve_device, resolve_dtype, resolve_kv_cache_dtype
from hetserve.worker.inputs import ModelInputs, prepare_inputs
from hetserve.worker.swap import HostKVCache

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, spec: ModelSpec, model_path: Path, config: EngineConfig, *, device: str = "auto",
                 layer_range: tuple[int, int] | None = None, shard: TensorShard | None = None,
                 all_reduce: AllReduce | None = None, kv_cache_memory: int | None = None):
        """`config` gives the options every worker shares (dtype, quantization, cache, seed); the
        keyword arguments are this worker's place in the plan."""
        self.spec = spec
        self.config = config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype, self.device)
        self.kv_cache_memory = kv_cache_memory
        self.offload: LayerOffload | None = None
        int4_checkpoint = read_int4_config(model_path)
        self.model = self._load_model(model_path, int4_checkpoint, layer_range, shard, all_reduce)
        self.quantization = resolve_quantization(config.model.quantization, model_path, spec, self.device, self.dtype,
                                                 self.offload is not None or int4_checkpoint is not None)
        if config.model.quantization == "auto" and self.quantization is not None:
            logger.info("quantization auto: %s, as the GGUF's layers are stored in 4-bit blocks "
                        "(--quantization none keeps them in %s)", self.quantization,
                        str(self.dtype).removeprefix("torch."))
        if self.quantization is not None:
            quantize_layers(self.model.layers, self.quantization,
                            GGUF_BLOCK_SIZE if Path(model_path).suffix == ".gguf" else None)
        if self.quantization is not None or int4_checkpoint is not None:
            quantize_lm_head(self.model)
        self.kv_caches: list[KVLayerCache] = []
        self.host_kv_cache: HostKVCache | None = None
        self.block_size = 0
        self.states: dict[str, SamplingState] = {}
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed)
        self.sampler = Sampler(spec.eos_token_ids, generator)

    def _load_model(self, path: Path, int4_checkpoint: Int4CheckpointConfig | None,
                    layer_range: tuple[int, int] | None, shard: TensorShard | None,
                    all_reduce: AllReduce | None) -> LlamaForCausalLM:
        with torch.device("meta"):
            model = LlamaForCausalLM(self.spec, layer_range, shard, all_reduce)
        if int4_checkpoint is not None:
            if self.config.model.quantization in QUANTIZATIONS:
                raise ValueError(f"the model is an int4 checkpoint already; drop quantization="
                                 f"{self.config.model.quantization}")
            if self.config.offload.enabled:
                raise ValueError("weight offload streams unquantized layers: an int4 checkpoint cannot be "
                                 "offloaded; drop memory_budget / cpu_offload_gb")
            load_int4_linears(model, path, int4_checkpoint, self.device, self.dtype)
        self.offload = offload_layers(model, Path(path), self.config, self.device, self.dtype)
        self._check_weights_fit(model)
        _materialize(model, self.device, self.dtype)
        model.rope = RotaryEmbedding(self.spec).to(self.device)  # buffers were on meta
        wanted = model.wants_weight if self.offload is None else self.offload.resident_weight
        model.load_weights(iter_weights(path, self.spec, lambda name: wanted(name) and not is_int4_tensor(name)))
        return model.eval()

    def _check_weights_fit(self, model: LlamaForCausalLM) -> None:
        needed = sum(p.numel() for p in model.parameters()) * self.dtype.itemsize
        free = available_memory(self.device)
        if needed > free:
            raise ValueError(f"layers [{model.start}, {model.end}) need {needed / 2**30:.2f} GiB of "
                             f"{str(self.dtype).removeprefix('torch.')} weights on {self.device}, but only {free / 2**30:.2f} GiB "
                             "is free there; give this device fewer layers or add devices")

    @property
    def samples(self) -> bool:
        """Whether this worker turns hidden states into tokens (last stage, first TP rank)."""
        return self.model.has_lm_head

    # -- KV cache ------------------------------------------------------------------------------

    def kv_bytes_per_block(self, block_size: int) -> int:
        per_head = kv_bytes_per_token_head(self.spec.head_dim, self.dtype.itemsize, self.config.cache.kv_cache_dtype)
        return block_size * self.model.num_layers * self.model.shard.num_kv_heads() * per_head

    def num_kv_blocks(self, cache: CacheConfig) -> int:
        """Blocks that fit this worker's KV memory (bytes, or a fraction of free memory)."""
        budget = self.kv_cache_memory or cache.kv_cache_memory
        if budget is None:
            budget = int(available_memory(self.device) * cache.kv_cache_memory_fraction)
            if self.device.type == "cpu":
                budget = min(budget, CPU_DEFAULT_KV_CACHE_CAP)
        return budget // self.kv_bytes_per_block(cache.block_size)

    def num_host_kv_blocks(self, cache: CacheConfig) -> int:
        """Blocks of host RAM for swapped-out requests (the swap space)."""
        return cache.swap_space // self.kv_bytes_per_block(cache.block_size)

    def init_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        shape = kv_cache_shape(num_blocks, block_size, self.model.shard.num_kv_heads(), self.spec.head_dim)
        self.kv_caches = [allocate_kv_cache(shape, self.kv_cache_dtype, self.device)
                          for _ in range(self.model.num_layers)]
        self.block_size = block_size
        self.model.enable_native_layers(self.kv_caches)
        if num_host_blocks:
            self.host_kv_cache = HostKVCache(self.kv_caches, num_host_blocks, self.device)

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput, hidden_in: torch.Tensor | None = None
                      ) -> torch.Tensor | ModelRunnerOutput:
        """Run this stage on a step. The first stage reads token ids, later ones `hidden_in` (the
        previous stage's output). Returns hidden states for the next stage, or on the last stage
        the sampled tokens (empty on TP ranks other than the first)."""
        if self.samples:
            self._update_states(scheduler_output)
        self._rewrite_sinks(scheduler_output.sink_rewrites)
        swap_seconds = self._swap(scheduler_output)
        if not scheduler_output.scheduled:
            return ModelRunnerOutput()
        self.model.rope.cover(max(r.start_pos + len(r.token_ids) for r in scheduler_output.scheduled))
        inputs = prepare_inputs(scheduler_output.scheduled, self.block_size, self.device)
        x = inputs.input_ids if self.model.is_first else hidden_in.to(self.device, self.dtype)
        hidden = self.model(x, inputs.positions, self.kv_caches, inputs.attention)
        if not self.model.is_last:
            return hidden
        output = self._sample(hidden, inputs) if self.samples else ModelRunnerOutput()
        output.swap_seconds = swap_seconds
        return output

    def _rewrite_sinks(self, rewrites: list[tuple[int, int, int]]) -> None:
        """Sliding window: refresh the in-table copies of attention-sink blocks, keys rotated forward by
        the tokens dropped so far, so sinks and window sit next to each other as StreamingLLM has it."""
        for original, copy, offset in rewrites:
            rotate = functools.partial(self.model.rope.rotate, offset=offset)
            for kv_cache in self.kv_caches:
                rewrite_block(kv_cache, original, copy, self.dtype, rotate)

    def _swap(self, scheduler_output: SchedulerOutput) -> float:
        if not (scheduler_output.blocks_to_swap_out or scheduler_output.blocks_to_swap_in):
            return 0.0
        if self.host_kv_cache is None:
            raise RuntimeError("the scheduler swapped blocks but this worker has no swap space")
        return self.host_kv_cache.swap(self.kv_caches, scheduler_output.blocks_to_swap_out,
                                       scheduler_output.blocks_to_swap_in)

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for request_id in scheduler_output.finished_request_ids:
            self.states.pop(request_id, None)
        for new in scheduler_output.new_requests:
            self.states[new.request_id] = self._new_state(new)

    def _new_state(self, new: NewRequestData) -> SamplingState:
        generator = make_generator(new.sampling_params.seed, self.device)
        return SamplingState(new.sampling_params, new.prompt_token_ids, generator)

    def _sample(self, hidden: torch.Tensor, inputs: ModelInputs) -> ModelRunnerOutput:
        output = ModelRunnerOutput()
        if inputs.sample_request_ids:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            states = [self.states[rid] for rid in inputs.sample_request_ids]
            tokens, logprobs = self.sampler(logits, states)
            for rid, state, token, lp in zip(inputs.sample_request_ids, states, tokens, logprobs):
                state.output_token_ids.append(token)
                output.sampled_token_ids[rid] = token
                if lp is not None:
                    output.logprobs[rid] = lp
        for rid, (rows, targets) in inputs.prompt_logprob_rows(self.states).items():
            count = self.states[rid].params.prompt_logprobs
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
            output.prompt_logprobs[rid] = token_logprobs(logprobs, targets, [count] * len(targets))
        return output


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace meta parameters by uninitialised storage; load_weights fills every one of them."""
    materialized: dict[int, nn.Parameter] = {}  # by the meta parameter's id: tied weights stay tied
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in materialized:
                materialized[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
            module._parameters[name] = materialized[id(param)]
