"""Pipeline parallelism on this machine: offline throughput of PP=2 (two worker processes, gloo)
against one worker, and the one-way cost of passing a step's activations across a stage boundary.

    .venv/bin/python benchmarks/pipeline.py --out results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hetserve import LLM, SamplingParams
from hetserve.planner.profiler import ping_pong_seconds


def throughput(num_prompts: int, max_tokens: int, **layout) -> dict:
    llm = LLM(max_num_seqs=num_prompts, **layout)
    prompts = [f"Question {i}: describe the history of the city number {i} in detail." for i in range(num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up (kernels, allocator)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    llm.engine.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"layout": layout, "seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def boundary_cost(hidden: int, sizes: list[int], iterations: int) -> dict:
    """One-way time (microseconds) to move [tokens, hidden] bf16 activations between two processes."""
    one_way = ping_pong_seconds([tokens * hidden * 2 for tokens in sizes], iterations)
    return {str(tokens): {"one_way_us": one_way[tokens * hidden * 2] * 1e6, "bytes": tokens * hidden * 2}
            for tokens in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="results/pipeline.json")
    args = parser.parse_args()
    runs = [throughput(args.num_prompts, args.max_tokens),
            throughput(args.num_prompts, args.max_tokens, pipeline_parallel_size=2)]
    report = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct (packaged GGUF), dtype auto",
        "workload": {"num_prompts": args.num_prompts, "max_tokens": args.max_tokens},
        "throughput": runs,
        "pp2_over_single": runs[1]["output_tokens_per_s"] / runs[0]["output_tokens_per_s"],
        "stage_boundary": boundary_cost(576, [1, 8, 32, 128, 512, 2048], iterations=200),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
