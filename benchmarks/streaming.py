"""StreamingLLM on SmolLM2: perplexity far past the context, in constant KV memory.

Teacher-forced (the StreamingLLM paper's measure): the log-likelihood of every token of a long English
text (the Python language reference that ships with every CPython, `pydoc_data.topics`), read in
chunks no longer than the window, for
  - dense attention over the whole text (the reference: an engine with a `--multiple` times longer
    context, so `--multiple` x `--context` must fit the model's trained context),
  - attention sinks + sliding window over `--multiple` times that many tokens,
  - the same window without sinks (positions still re-applied in the cache),
reported as perplexity per `--context`-token segment, with the most KV blocks held.
Generated: one stream sampling `--multiple` x `--context` tokens with sinks + window; the mean
negative log-likelihood the model gives its own tokens, per segment.

    .venv/bin/python benchmarks/streaming.py --out results/streaming.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import pydoc_data.topics

from hetserve import LLM, SamplingParams
from hetserve.model.loader import load_tokenizer, resolve_model_path


def long_text() -> str:
    return "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))


def run(llm: LLM, tokens: list[int], params: SamplingParams) -> tuple[list[float], list[int], int]:
    """Prompt log-likelihoods, generated tokens' log-likelihoods, and the most KV blocks held."""
    engine = llm.engine
    engine.add_request("stream", None, params, prompt_token_ids=tokens)
    most_blocks, result = 0, None
    while engine.has_unfinished_requests():
        for output in engine.step():
            result = output
        most_blocks = max(most_blocks, engine.block_manager.num_used_blocks)
    prompt = [entry.logprob for entry in (result.prompt_logprobs or [])[1:]]
    generated = [entry.logprob for entry in (result.outputs[0].logprobs or [])]
    return prompt, generated, most_blocks


def per_segment(logprobs: list[float], segment: int) -> list[float]:
    return [math.exp(-sum(part) / len(part)) for i in range(0, len(logprobs), segment)
            if (part := logprobs[i:i + segment])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048, help="max_model_len of the runs")
    parser.add_argument("--multiple", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--generate-context", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("results/streaming.json"))
    args = parser.parse_args()
    kv = {"dtype": "float32", "kv_cache_memory": "512MiB", "max_num_batched_tokens": args.window}
    length = args.multiple * args.context
    tokens = load_tokenizer(resolve_model_path(None)).encode(long_text())[:length]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    report = {"benchmark": "streaming", "machine": platform.machine(), "text_tokens": len(tokens),
              "context": args.context, "window": args.window, "sinks": args.sinks, "runs": []}
    setups = [("dense, whole text", {"max_model_len": length}, tokens[:-1]),
              (f"{args.sinks} sinks + window {args.window}", {"max_model_len": args.context,
               "sliding_window": args.window, "attention_sinks": args.sinks}, tokens),
              (f"window {args.window}, no sinks", {"max_model_len": args.context,
               "sliding_window": args.window, "attention_sinks": 0}, tokens)]
    for name, options, text in setups:
        llm = LLM(**options, **kv)  # one engine at a time: each holds its own weights and KV pool
        start = time.perf_counter()
        logprobs, _, blocks = run(llm, text, score)
        del llm
        segments = per_segment(logprobs, args.context)
        report["runs"].append({"setup": name, "tokens": len(text), "seconds": time.perf_counter() - start,
                               "perplexity_per_segment": segments, "max_kv_blocks": blocks})
        print(f"{name}: perplexity per {args.context}-token segment {[round(p, 2) for p in segments]}, "
              f"at most {blocks} KV blocks", flush=True)
    stream = LLM(max_model_len=args.generate_context, sliding_window=args.generate_context // 2,
                 attention_sinks=args.sinks, **kv)
    prompt = tokens[:64]
    sample = SamplingParams(max_tokens=args.multiple * args.generate_context, temperature=0.8, top_p=0.95,
                            seed=0, logprobs=0, ignore_eos=True)
    start = time.perf_counter()
    _, generated, blocks = run(stream, prompt, sample)
    nll = [-sum(p) / len(p) for i in range(0, len(generated), args.generate_context)
           if (p := generated[i:i + args.generate_context])]
    report["generation"] = {"max_model_len": args.generate_context, "window": args.generate_context // 2,
                            "tokens": len(generated), "seconds": time.perf_counter() - start,
                            "mean_nll_per_segment": nll, "max_kv_blocks": blocks}
    print(f"generated {len(generated)} tokens at max_model_len {args.generate_context}: mean NLL per segment "
          f"{[round(x, 2) for x in nll]}, at most {blocks} KV blocks", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
