"""Which requests a step serves first and preempts last: FCFS, priority, or FastServe's skip-join
multi-level feedback queue (MLFQ).

A policy ranks requests by a sort key; the scheduler serves running requests in key order, admits
waiting ones in key order, preempts the running request with the largest key when KV runs out, and
lets a waiting request whose key beats a running one's take that one's place. Under FCFS the key is
the arrival order, so the last rule never fires: everything running arrived before everything waiting.
"""

from __future__ import annotations

import itertools

from hetserve.core.request import Request

POLICIES = ("fcfs", "priority", "mlfq")

# Skip-join places a request by the cost of its prompt, counted in decode tokens: one prompt token costs
# about a sixteenth of one request's decode step (measured on CPU: ~0.3 ms per prefilled token against
# ~3 ms per request-step at batch 32; GPUs prefill relatively faster still). Only the entry level
# depends on it.
PROMPT_TOKENS_PER_DECODE_TOKEN = 16


class FCFSPolicy:
    """First come, first served: the key is the order of arrival."""

    def __init__(self) -> None:
        self._arrivals = itertools.count()
        self._order: dict[str, int] = {}

    def add(self, request: Request) -> None:
        self._order[request.request_id] = next(self._arrivals)

    def remove(self, request: Request) -> None:
        self._order.pop(request.request_id, None)

    def key(self, request: Request) -> tuple[int, ...]:
        return (self._order[request.request_id],)

    def on_token(self, request: Request) -> None:
        """A request produced a token."""

    def on_step(self, waiting: list[Request]) -> bool:
        """Called once per step before scheduling; True when some waiting request's key changed."""
        return False


class PriorityPolicy(FCFSPolicy):
    """vLLM's priority scheduling: a smaller `priority` value first, then arrival order."""

    def key(self, request: Request) -> tuple[int, ...]:
        return (request.priority, self._order[request.request_id])


class MLFQPolicy(FCFSPolicy):
    """FastServe's skip-join MLFQ. Level i grants a quantum of `quantum * 2**i` output tokens; a request
    that uses up its level's quantum moves one level down, so long generations yield to short ones
    without anyone knowing output lengths in advance. A new request skips the levels whose quantum its
    prompt alone would exceed, so a long prompt cannot hold the top level for a whole prefill.
    A request left waiting for `starvation_steps` steps returns to the top level."""

    def __init__(self, num_levels: int, quantum: int, starvation_steps: int):
        super().__init__()
        self.num_levels, self.quantum, self.starvation_steps = num_levels, quantum, starvation_steps
        self._level: dict[str, int] = {}
        self._tokens_at_level: dict[str, int] = {}
        self._waiting_since: dict[str, int] = {}
        self._step = 0

    def entry_level(self, num_prompt_tokens: int) -> int:
        cost = num_prompt_tokens / PROMPT_TOKENS_PER_DECODE_TOKEN
        level = 0
        while level < self.num_levels - 1 and cost > self.quantum * 2**level:
            level += 1
        return level

    def level(self, request: Request) -> int:
        return self._level[request.request_id]

    def add(self, request: Request) -> None:
        super().add(request)
        self._level[request.request_id] = self.entry_level(request.num_prompt_tokens)
        self._tokens_at_level[request.request_id] = 0

    def remove(self, request: Request) -> None:
        super().remove(request)
        for state in (self._level, self._tokens_at_level, self._waiting_since):
            state.pop(request.request_id, None)

    def key(self, request: Request) -> tuple[int, ...]:
        return (self._level[request.request_id], self._order[request.request_id])

    def on_token(self, request: Request) -> None:
        rid = request.request_id
        self._tokens_at_level[rid] += 1
        level = self._level[rid]
        if self._tokens_at_level[rid] >= self.quantum * 2**level and level < self.num_levels - 1:
            self._level[rid] = level + 1
            self._tokens_at_level[rid] = 0

    def on_step(self, waiting: list[Request]) -> bool:
        self._step += 1
        promoted = False
        waiting_ids = set()
        for request in waiting:
            rid = request.request_id
            waiting_ids.add(rid)
            since = self._waiting_since.setdefault(rid, self._step)
            if self._step - since >= self.starvation_steps and self._level[rid] > 0:
                self._level[rid], self._tokens_at_level[rid] = 0, 0
                self._waiting_since[rid] = self._step
                promoted = True
        # A request that left the queue starts a fresh wait when it comes back (preempted).
        for rid in [r for r in self._waiting_since if r not in waiting_ids]:
            del self._waiting_since[rid]
        return promoted


def make_policy(name: str, mlfq_num_levels: int = 4, mlfq_quantum: int = 32,
                mlfq_starvation_steps: int = 500) -> FCFSPolicy:
    """The policy named `name`; FCFSPolicy is the interface all three share."""
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "mlfq":
        return MLFQPolicy(mlfq_num_levels, mlfq_quantum, mlfq_starvation_steps)
    raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got {name!r}")
