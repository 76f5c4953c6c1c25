"""Quality of weight-only quantization of the packaged model, measured on held-out text: perplexity,
teacher-forced top-1 agreement with bf16, and greedy-generation agreement with bf16 (on held-out text
and on chat questions), for bf16 / int8 / int4 round to nearest (groups of 32, which keep the GGUF's
Q4_1 blocks, and of 128) / int4 AWQ (128).

The int4 g128 models are checkpoints written by `hetserve quantize` and served from them. Groups are
128 where a projection's input allows it: SmolLM2-135M's 576-wide inputs (q/k/v, o, gate/up) take 64,
its 1536-wide down projection 128. AWQ calibrates on the first half of Python's pydoc topics; the
evaluation text is the second half.

    .venv/bin/python benchmarks/quantization_quality.py --out results/quantization_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hetserve import LLM, SamplingParams
from hetserve.config import QuantizeConfig
from hetserve.model.awq import calibration_and_held_out_text
from hetserve.quantize import quantize_model


CHAT_QUESTIONS = ("What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
                  "Write a haiku about the sea.", "What is 2+2?", "Who wrote Romeo and Juliet?",
                  "Explain what a CPU does.", "Give me a tip for sleeping better.", "What is the boiling point of water?",
                  "Translate 'hello' to Spanish.", "What is photosynthesis?", "Suggest a name for a cat.")
"""Chat prompts: the model's own use, unlike the documentation text AWQ calibrates on."""


@dataclass
class Evaluation:
    predictions: list[int]
    """Teacher-forced top-1 token at every held-out position."""
    logprobs: list[float]
    """Log-probability of the actual held-out token at every position."""
    generations: list[list[int]]
    chat_generations: list[list[int]]


def held_out_windows(llm: LLM, num_tokens: int, window: int) -> list[list[int]]:
    _, text = calibration_and_held_out_text()
    tokens = llm.get_tokenizer().encode(text, add_special_tokens=False)[:num_tokens]
    return [tokens[i:i + window] for i in range(0, len(tokens), window)]


def evaluate(llm: LLM, windows: list[list[int]], prompts: list[list[int]], max_tokens: int) -> Evaluation:
    scored = llm.generate(windows, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    entries = [entry for output in scored for entry in output.prompt_logprobs[1:]]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    greedy = llm.generate(prompts, params)
    chats = llm.chat([[{"role": "user", "content": question}] for question in CHAT_QUESTIONS], params)
    return Evaluation([e.top[0][0] for e in entries], [e.logprob for e in entries],
                      [list(o.outputs[0].token_ids) for o in greedy], [list(o.outputs[0].token_ids) for o in chats])


def compare(run: Evaluation, reference: Evaluation) -> dict:
    pairs = list(zip(run.predictions, reference.predictions))
    same_positions = [a == b for ours, theirs in zip(run.generations, reference.generations)
                      for a, b in zip(ours, theirs)]
    return {
        "perplexity": math.exp(-sum(run.logprobs) / len(run.logprobs)),
        "top1_agreement_with_bf16": sum(a == b for a, b in pairs) / len(pairs),
        "greedy_token_agreement_with_bf16": sum(same_positions) / len(same_positions),
        "greedy_identical_prefix_tokens": _mean_common_prefix(run.generations, reference.generations),
        "chat_greedy_identical_prefix_tokens": _mean_common_prefix(run.chat_generations, reference.chat_generations),
    }


def _mean_common_prefix(runs: list[list[int]], references: list[list[int]]) -> float:
    return sum(_common_prefix(a, b) for a, b in zip(runs, references)) / len(runs)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def write_checkpoints(work_dir: Path, calibration_tokens: int) -> dict[str, tuple[Path, float | None]]:
    """The int4 g128 checkpoints, each with the seconds `hetserve quantize` took (None: it was there)."""
    checkpoints = {}
    for method in ("rtn", "awq"):
        if (work_dir / method / "config.json").is_file():
            checkpoints[f"int4-{method}-g128"] = (work_dir / method, None)
            continue
        start = time.perf_counter()
        path = quantize_model(QuantizeConfig(output=str(work_dir / method), method=method, group_size=128,
                                             calibration_tokens=calibration_tokens), "cpu")
        checkpoints[f"int4-{method}-g128"] = (path, time.perf_counter() - start)
        print(f"quantized {method} in {checkpoints[f'int4-{method}-g128'][1]:.0f} s", flush=True)
    return checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="Held-out tokens scored.")
    parser.add_argument("--window", type=int, default=512, help="Tokens per scored window.")
    parser.add_argument("--prompts", type=int, default=8, help="Greedy-generation prompts (from held-out windows).")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32, help="Greedy tokens generated per prompt.")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--work-dir", default=None,
                        help="Where the int4 checkpoints go (kept, and reused when there); default: a temporary one.")
    parser.add_argument("--out", default="results/quantization_quality.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        checkpoints = write_checkpoints(Path(args.work_dir or temporary), args.calibration_tokens)
        variants = {"bf16": {}, "int8": {"quantization": "int8"}, "int4-rtn-g32": {"quantization": "int4"}}
        variants |= {name: {"model": str(path)} for name, (path, _) in checkpoints.items()}
        runs, reference, windows, prompts = [], None, None, None
        for name, kwargs in variants.items():
            llm = LLM(dtype="bfloat16", max_num_seqs=32, **kwargs)
            if windows is None:
                windows = held_out_windows(llm, args.eval_tokens, args.window)
                prompts = [w[:args.prompt_tokens] for w in windows[:args.prompts]]
            evaluation = evaluate(llm, windows, prompts, args.max_tokens)
            reference = reference or evaluation
            runs.append({"model": name, **compare(evaluation, reference),
                         **({"quantize_seconds": checkpoints[name][1]} if name in checkpoints else {})})
            print(json.dumps(runs[-1]), flush=True)
            del llm
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "scored_tokens": len(reference.predictions), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
