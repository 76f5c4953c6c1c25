"""StreamingLLM: attention sinks plus a sliding window, with in-cache positions, in constant KV memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetserve import LLM, SamplingParams
from hetserve.core.block_manager import BlockManager
from hetserve.core.request import Request
from hetserve.model.llama import RotaryEmbedding
from hetserve.model.loader import load_spec
from tests.tiny_models import make_hf_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("hf") / "llama", "llama", num_layers=2)


def test_the_window_slides_in_whole_blocks_and_memory_stays_flat():
    bs, window = 2, 4
    manager = BlockManager(num_blocks=12, block_size=bs, enable_prefix_caching=False, sliding_window=window,
                           num_sink_blocks=1)
    request = Request("r", [5, 6, 7], SamplingParams())
    offsets = []
    for _ in range(40):
        num_new = request.num_tokens - request.num_computed_tokens
        assert manager.allocate(request, num_new)
        request.num_computed_tokens += num_new
        request.output_token_ids.append(1)
        in_cache = request.num_computed_tokens - request.cache_offset
        table = manager.block_table("r")
        assert len(table) == manager.blocks_needed(in_cache) <= 1 + window // bs + 1
        assert in_cache <= bs + window + bs and request.cache_offset % bs == 0
        for original, copy, offset in manager.take_sink_rewrites():
            assert copy == table[0] and original not in table and offset == request.cache_offset
            offsets.append(offset)
    assert offsets == sorted(offsets) and offsets[-1] == request.cache_offset > 30
    assert manager.usage().used == len(manager.block_table("r")) + 1  # the sinks' original block
    manager.free(request)
    assert manager.usage().used == 0


def test_sinks_rotated_forward_see_the_window_at_in_cache_distances(tiny_model):
    """StreamingLLM places sinks and window side by side: keys at cache positions 0..n-1, the query at n.
    hetserve keeps keys at their text positions and rotates only the sinks forward by the dropped count;
    the attention must be the same."""
    rope = RotaryEmbedding(load_spec(tiny_model))
    torch.manual_seed(0)
    heads, dim, sinks, window, dropped = 2, rope.cos.shape[1], 4, 12, 5000
    rope.cover(sinks + dropped + window + 1)
    q, k, v = (torch.randn(n, heads, dim) for n in (1, sinks + window, sinks + window))

    def rotated(positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return rope.at(positions, x.dtype).apply(x)

    def attention(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query.transpose(0, 1), keys.transpose(0, 1), v.transpose(0, 1))

    in_cache = attention(rotated(torch.tensor([sinks + window]), q), rotated(torch.arange(sinks + window), k))
    text_positions = torch.cat([torch.arange(sinks), torch.arange(sinks + dropped, sinks + dropped + window)])
    keys = rotated(text_positions, k)
    keys[:sinks] = rope.rotate(keys[:sinks], dropped)
    ours = attention(rotated(torch.tensor([sinks + dropped + window]), q), keys)
    torch.testing.assert_close(ours, in_cache, atol=1e-5, rtol=1e-5)


def test_a_window_that_never_fills_changes_nothing(tiny_model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [7] * 11]
    dense = LLM(model=str(tiny_model), dtype="float32").generate(prompts, params)
    windowed = LLM(model=str(tiny_model), dtype="float32", sliding_window=64).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in windowed] == [o.outputs[0].token_ids for o in dense]


def test_a_stream_runs_four_times_past_max_model_len_in_flat_memory(tiny_model):
    llm = LLM(model=str(tiny_model), dtype="float32", max_model_len=64, block_size=4, sliding_window=16,
              attention_sinks=4)
    engine = llm.engine
    engine.add_request("long", None, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True),
                       prompt_token_ids=list(range(10, 30)))
    engine.add_request("short", None, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       prompt_token_ids=[3, 4, 5])
    used, outputs = [], {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0].token_ids
        used.append(engine.block_manager.num_used_blocks)
    assert len(outputs["long"]) == 256 and len(outputs["short"]) == 8
    # sinks (1 block) + their rotated copy + a window of 4 blocks + the block being filled, + "short"'s 3
    assert max(used) <= 1 + 1 + 4 + 1 + 3 and max(used[-100:]) <= 7
    assert engine.block_manager.num_used_blocks == 0
    alone = LLM(model=str(tiny_model), dtype="float32", block_size=4).generate(
        [[3, 4, 5]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert outputs["short"] == alone[0].outputs[0].token_ids


def test_streaming_flags_are_validated():
    with pytest.raises(ValueError, match="sliding_window must be at least block_size"):
        LLM(sliding_window=8, block_size=16)
    with pytest.raises(ValueError, match="attention_sinks"):
        LLM(sliding_window=64, attention_sinks=-1)
