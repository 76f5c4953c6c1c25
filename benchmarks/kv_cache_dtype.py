"""KV-cache storage on this CPU: the packaged model with --kv-cache-dtype auto (the model dtype), int8
and fp8. For each: KV blocks in the same --kv-cache-memory and how many sequences of --context-len
tokens they hold at once; decode tokens/s at batch 32 (timed from the step where every request has
its first token, so prefill is left out); and how often the greedy tokens agree with the first
dtype's (auto's).

    .venv/bin/python benchmarks/kv_cache_dtype.py --out results/kv_cache_dtype.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from hetserve import LLM, SamplingParams

WORDS = ("river mountain ocean city forest desert planet history king bridge market winter harbour castle "
         "language music engine garden library storm island village bread science war trade law school").split()


def make_prompts(llm: LLM, batch: int, prompt_len: int) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_len` tokens: a question followed by random words, so that
    greedy continuations are not just the prompt repeated (which any cache reproduces)."""
    tokenizer = llm.get_tokenizer()
    prompts = []
    for i in range(batch):
        rng = random.Random(i)
        words = " ".join(rng.choice(WORDS) for _ in range(prompt_len))
        ids = tokenizer.encode(f"Question {i}: write a story about these words. {words}")
        assert len(ids) >= prompt_len, "prompt text too short"
        prompts.append(ids[:prompt_len])
    return prompts


def decode_run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Greedy outputs, and decode tokens/s once every request has been prefilled."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", None, params, prompt_token_ids=ids)
    tokens: dict[str, list[int]] = {}
    start = tokens_at_start = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] = output.outputs[0].token_ids
        if start is None and len(tokens) == len(prompts):
            start, tokens_at_start = time.perf_counter(), sum(map(len, tokens.values()))
    seconds = time.perf_counter() - start
    decoded = sum(map(len, tokens.values())) - tokens_at_start
    return decoded / seconds, [tokens[f"r{i}"] for i in range(len(prompts))]


def agreement(reference: list[list[int]], outputs: list[list[int]]) -> dict:
    """Share of positions with the same token, and the mean run of equal tokens from the start."""
    same = sum(a == b for ref, out in zip(reference, outputs) for a, b in zip(ref, out))
    prefixes = [next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref))
                for ref, out in zip(reference, outputs)]
    return {"token_agreement": same / sum(map(len, reference)),
            "mean_common_prefix": sum(prefixes) / len(prefixes)}


def capacity(llm: LLM, context_len: int) -> dict:
    blocks = llm.engine.block_manager.num_blocks
    blocks_per_seq = -(-context_len // llm.engine.config.cache.block_size)
    return {"num_kv_blocks": blocks, f"max_seqs_of_{context_len}_tokens": blocks // blocks_per_seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--context-len", type=int, default=2048, help="Sequence length the capacity counts.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2,
                        help="Timed runs of each dtype, interleaved (A B C A B C) so that load from other "
                             "processes falls on all of them alike; the best is reported.")
    parser.add_argument("--dtypes", default="auto,int8,fp8")
    parser.add_argument("--out", default="results/kv_cache_dtype.json")
    args = parser.parse_args()
    engines = {name: LLM(kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=name, max_num_seqs=args.batch,
                         max_model_len=2048) for name in args.dtypes.split(",")}
    prompts = make_prompts(next(iter(engines.values())), args.batch, args.prompt_len)
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    outputs = {}
    for _ in range(args.rounds):
        for name, llm in engines.items():
            tokens_per_s, outputs[name] = decode_run(llm, prompts, args.max_tokens)
            speeds[name].append(tokens_per_s)
    reference = outputs[next(iter(engines))]
    runs = []
    for name, llm in engines.items():
        runs.append({"kv_cache_dtype": name, "model_dtype": str(llm.engine.executor.dtype),
                     **capacity(llm, args.context_len),
                     f"decode_tokens_per_s_batch_{args.batch}": max(speeds[name]),
                     "decode_tokens_per_s_runs": speeds[name],
                     "greedy_vs_first": agreement(reference, outputs[name])})
        print(json.dumps(runs[-1]), flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "settings": vars(args), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
