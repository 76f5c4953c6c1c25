"""`hetserve bench`: a load generator and latency report for any OpenAI-compatible server, with
vLLM's metric definitions (`vllm bench serve`) so figures compare across servers.

workloads (prompts) -> load (arrivals, streaming client) -> metrics (summary) -> report (table, JSON, plots)
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(text: str, default: Any) -> Any:
    """A config field whose help text becomes its --flag's help (hetserve.flags.add_dataclass_flags)."""
    return field(default=default, metadata={"help": text})
