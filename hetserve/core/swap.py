"""Swapping preempted requests' KV to host RAM: the pool of host blocks, and the cost rule that
chooses between swapping a request out and recomputing it later."""

from __future__ import annotations

from dataclasses import dataclass

# Steps with fewer tokens than this are mostly decode and say little about what a prefill costs.
_MIN_PREFILL_TOKENS = 64
_SMOOTHING = 0.2


class HostBlockPool:
    """Host blocks, each the size of a device block. Blocks given back during a step become free
    only at the end of the step: the step's swap-ins still read them after its swap-outs wrote."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._released: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int] | None:
        """`count` blocks, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        taken = self._free[len(self._free) - count:]
        del self._free[len(self._free) - count:]
        return taken

    def release(self, blocks: list[int]) -> None:
        self._released.extend(blocks)

    def end_step(self) -> None:
        self._free.extend(self._released)
        self._released.clear()


@dataclass
class PreemptionCosts:
    """Running estimates, from the engine's own steps, of what recomputing a token and copying a
    block each way cost. Swapping is tried until both are known: prefill steps always come before
    the first preemption, and a swap measures the copy."""

    recompute_s_per_token: float | None = None
    swap_s_per_block: float | None = None

    def observe_step(self, seconds: float, num_tokens: int) -> None:
        if num_tokens >= _MIN_PREFILL_TOKENS:
            self.recompute_s_per_token = _smooth(self.recompute_s_per_token, seconds / num_tokens)

    def observe_swap(self, seconds: float, num_blocks: int) -> None:
        if num_blocks:
            self.swap_s_per_block = _smooth(self.swap_s_per_block, seconds / num_blocks)

    def prefers_swap(self, num_tokens: int, num_blocks: int) -> bool:
        """Swap out and back in (two copies) rather than recompute `num_tokens` tokens?"""
        if self.recompute_s_per_token is None or self.swap_s_per_block is None:
            return True
        return 2 * num_blocks * self.swap_s_per_block <= num_tokens * self.recompute_s_per_token


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * new
