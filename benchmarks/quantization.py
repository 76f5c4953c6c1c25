"""Weight-only quantization on this CPU: offline decode throughput of the packaged model in bf16,
int8 and int4 at batch 1 and 32, and how often each keeps bf16's greedy next-token prediction on a
held-out text (teacher forced).

    .venv/bin/python benchmarks/quantization.py --out results/quantization.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hetserve import LLM, SamplingParams

TEXT = ("The history of the city begins with a small fishing village on the banks of a wide river. Over the "
        "centuries, merchants built warehouses along the water, and the village grew into a busy port that traded "
        "wool, grain and timber with towns across the sea. In the nineteenth century a railway reached the city, "
        "and with it came mills, foundries and thousands of workers from the countryside.")


def decode_throughput(llm: LLM, batch: int, max_tokens: int) -> float:
    prompts = [f"Question {i}: describe the history of the city number {i} in detail." for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def top1_predictions(llm: LLM) -> list[int]:
    entries = llm.generate(TEXT, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0].prompt_logprobs
    return [entry.top[0][0] for entry in entries[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="results/quantization.json")
    args = parser.parse_args()
    runs, reference = [], None
    for quantization in (None, "int8", "int4"):
        llm = LLM(dtype="bfloat16", quantization=quantization, max_num_seqs=32)
        predictions = top1_predictions(llm)
        reference = reference or predictions
        runs.append({"quantization": quantization or "bf16",
                     "tokens_per_s_batch_1": decode_throughput(llm, 1, args.max_tokens),
                     "tokens_per_s_batch_32": decode_throughput(llm, 32, args.max_tokens),
                     "top1_agreement_with_bf16": sum(a == b for a, b in zip(reference, predictions)) / len(reference)})
        print(json.dumps(runs[-1]), flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
