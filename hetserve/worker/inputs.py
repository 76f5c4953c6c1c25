"""From a step's scheduled requests to the model's flat input tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetserve.core.outputs import ScheduledRequest
from hetserve.model.attention import AttentionMetadata, PrefillChunk
from hetserve.model.sampler import SamplingState


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionMetadata
    sample_rows: torch.Tensor
    """Row of the last token of each request that samples this step."""
    sample_request_ids: list[str]
    first_rows: list[tuple[ScheduledRequest, int]]
    """Each scheduled request with the row of its first token."""

    def prompt_logprob_rows(self, states: dict[str, SamplingState]
                            ) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """Rows whose logits predict a prompt token, and those tokens, for requests that asked
        for prompt logprobs. Row i predicts the token at position i + 1."""
        result = {}
        for scheduled, row in self.first_rows:
            state = states[scheduled.request_id]
            if state.params.prompt_logprobs is None:
                continue
            prompt = state.prompt_token_ids
            end = min(scheduled.start_pos + len(scheduled.token_ids), len(prompt) - 1)
            if end <= scheduled.start_pos:
                continue
            offsets = range(end - scheduled.start_pos)
            rows = torch.tensor([row + i for i in offsets], device=self.input_ids.device)
            targets = [prompt[scheduled.start_pos + i + 1] for i in offsets]
            result[scheduled.request_id] = (rows, targets)
        return result


def prepare_inputs(scheduled: list[ScheduledRequest], block_size: int, device: torch.device
                   ) -> ModelInputs:
    # Decode tokens first: their attention is one batched call over rows [0, num_decodes).
    decodes = [r for r in scheduled if len(r.token_ids) == 1]
    prefills = [r for r in scheduled if len(r.token_ids) > 1]
    ordered = decodes + prefills
    lengths = np.array([len(r.token_ids) for r in ordered])
    first_rows = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    input_ids = np.concatenate([r.token_ids for r in ordered])
    positions = np.concatenate([np.arange(r.start_pos, r.start_pos + len(r.token_ids)) for r in ordered])
    slots = np.concatenate([_slots(r, block_size) for r in ordered])

    def tensor(values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)

    max_blocks = max((len(r.block_ids) for r in decodes), default=0)
    attention = AttentionMetadata(
        slot_mapping=tensor(slots),
        num_decodes=len(decodes),
        decode_block_tables=tensor([r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in decodes]
                                   ).reshape(len(decodes), max_blocks),
        decode_context_lens=tensor([r.start_pos - r.cache_offset + 1 for r in decodes]),
        prefills=[
            PrefillChunk(int(row), len(r.token_ids), r.start_pos - r.cache_offset, tensor(r.block_ids))
            for r, row in zip(prefills, first_rows[len(decodes):])
        ],
    )
    samplers = [(r.request_id, int(row + n - 1)) for r, row, n in zip(ordered, first_rows, lengths) if r.sample]
    return ModelInputs(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        attention=attention,
        sample_rows=tensor([row for _, row in samplers]),
        sample_request_ids=[rid for rid, _ in samplers],
        first_rows=list(zip(ordered, first_rows.tolist())),
    )


def _slots(request: ScheduledRequest, block_size: int) -> np.ndarray:
    start = request.start_pos - request.cache_offset
    positions = np.arange(start, start + len(request.token_ids))
    blocks = np.asarray(request.block_ids, dtype=np.int64)[positions // block_size]
    return blocks * block_size + positions % block_size
