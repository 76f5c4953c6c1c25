"""The requests of a `hetserve bench` workload as the simulator takes them: token ids and arrival times."""

from __future__ import annotations

from collections.abc import Sequence

from hetserve.bench.workloads import Request
from hetserve.sim.simulator import SimRequest


def to_sim_requests(requests: Sequence[Request], arrival_times: Sequence[float]) -> list[SimRequest]:
    """Each word of a prompt becomes one token id (the same word, the same id), so prompts that share
    a prefix share its token ids and hit the prefix cache as they would on a server. The id list is
    then cut or extended to the prompt's length in tokens."""
    vocabulary: dict[str, int] = {}
    sim_requests = []
    for request, arrival in zip(requests, arrival_times):
        ids = [vocabulary.setdefault(word, len(vocabulary)) for word in request.prompt.split()] or [0]
        ids = (ids * (request.prompt_len // len(ids) + 1))[:max(1, request.prompt_len)]
        sim_requests.append(SimRequest(ids, request.max_tokens, arrival))
    return sim_requests
