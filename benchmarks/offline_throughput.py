"""Offline generation throughput: hetserve's LLM.generate beside transformers' generate.

Both run in this one process on the same prompts (64 prompts of 100-400 tokens, 128 output tokens
each, EOS ignored so every request produces exactly 128 tokens), one after the other:
    .venv/bin/python benchmarks/offline_throughput.py --out results/offline_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from hetserve import LLM, SamplingParams
from hetserve.model.loader import resolve_model_path

WORDS = ("the of and to in is was for on that with as by at from his her an which this be are "
         "river mountain city history science music energy planet ocean forest language machine "
         "people government system water light money power market student teacher").split()


def make_prompts(tokenizer, count: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.randint(min_len, max_len)
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(length * 2)))
        prompts.append(ids[:length])
    return prompts


def bench_hetserve(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"engine": "hetserve", "dtype": str(llm.engine.executor.dtype),
            "quantization": llm.engine.executor.workers[0].quantization, "seconds": elapsed,
            "output_tokens": generated, "output_tokens_per_s": generated / elapsed}


def bench_transformers(model_path: Path, prompts: list[list[int]], output_len: int, batch_size: int,
                       dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.eval()
    pad = 0
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=pad)
        generated += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - start
    return {"engine": "transformers", "dtype": str(dtype), "batch_size": batch_size, "seconds": elapsed,
            "output_tokens": generated, "output_tokens_per_s": generated / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-input-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=400)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default="auto",
                        help="hetserve's --quantization: auto (its default), none, int8 or int4; transformers stays in --dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/offline_throughput.json"))
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization)
    prompts = make_prompts(llm.get_tokenizer(), args.num_prompts, args.min_input_len, args.max_input_len,
                           args.seed)
    results = [bench_hetserve(llm, prompts, args.output_len)]
    del llm
    if not args.skip_transformers:
        results.append(bench_transformers(resolve_model_path(args.model), prompts, args.output_len,
                                          args.hf_batch_size, getattr(torch, args.dtype)))
    report = {
        "benchmark": "offline_throughput",
        "model": str(resolve_model_path(args.model)),
        "num_prompts": len(prompts),
        "input_tokens": sum(len(p) for p in prompts),
        "output_len": args.output_len,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    if len(results) == 2:
        report["speedup_vs_transformers"] = results[0]["output_tokens_per_s"] / results[1]["output_tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
