"""hetserve command line: `hetserve serve | generate | bench | simulate | plan | profile | quantize`.
Flags come from the config dataclasses, so `--help` shows each field's documentation."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from hetserve.bench.cli import add_bench_parser, run_bench
from hetserve.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, OffloadConfig, ParallelConfig,
                             SchedulerConfig, ServerConfig)
from hetserve.flags import add_dataclass_flags, collect
from hetserve.planner.cli import add_plan_parser, add_profile_parser, run_plan, run_profile
from hetserve.quantize import add_quantize_parser, run_quantize
from hetserve.sim.cli import add_simulate_parser, run_simulate
from hetserve.sampling_params import SamplingParams

ENGINE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, DeviceConfig, ParallelConfig, OffloadConfig)
SAMPLING_FLAGS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "ignore_eos",
                  "skip_special_tokens")
SAMPLING_HELP = {
    "n": "Number of samples to generate.",
    "temperature": "Sampling temperature; 0 is greedy (the default here).",
    "top_p": "Nucleus sampling: keep the smallest set of tokens with this much probability.",
    "top_k": "Keep only the k most likely tokens (0: all).",
    "min_p": "Drop tokens less likely than min_p times the most likely one.",
    "presence_penalty": "Penalise tokens already generated, once each.",
    "frequency_penalty": "Penalise tokens by how often they were generated.",
    "repetition_penalty": "Divide the logits of tokens seen in prompt or output by this (>1 discourages).",
    "seed": "Seed of this request's sampler.",
    "max_tokens": "Most tokens to generate.",
    "min_tokens": "Generate at least this many tokens before EOS or stop tokens may end the output.",
    "stop": "Stop string (repeat the flag for several).",
    "ignore_eos": "Keep generating after the end-of-sequence token.",
    "skip_special_tokens": "Leave special tokens out of the text.",
}


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {}
    for cls in ENGINE_CONFIGS:
        kwargs.update(collect(args, cls))
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Serve a model over an OpenAI-compatible HTTP API.")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="Model to serve (same as --model).")
    for cls in ENGINE_CONFIGS + (ServerConfig,):
        add_dataclass_flags(serve, cls)
    generate = commands.add_parser("generate", help="Generate text for one prompt, streamed to stdout.")
    generate.add_argument("--prompt", required=True, help="The prompt text.")
    generate.add_argument("--chat", action="store_true",
                          help="Send the prompt as a user message through the model's chat template.")
    generate.add_argument("--system", default=None, help="System message (with --chat).")
    generate.add_argument("-v", "--verbose", action="store_true", help="Log engine details to stderr.")
    for cls in ENGINE_CONFIGS:
        add_dataclass_flags(generate, cls)
    add_dataclass_flags(generate, SamplingParams, SAMPLING_FLAGS, SAMPLING_HELP)
    add_bench_parser(commands)
    add_simulate_parser(commands)
    add_plan_parser(commands)
    add_profile_parser(commands)
    add_quantize_parser(commands)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from hetserve.engine.llm import LLM

    sampling = {"temperature": 0.0, "max_tokens": 256, **collect(args, SamplingParams)}
    params = SamplingParams(**{k: v for k, v in sampling.items() if k in SAMPLING_FLAGS})
    llm = LLM(**engine_kwargs(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt_ids = llm.render_chat(messages + [{"role": "user", "content": args.prompt}])
        llm.engine.add_request("cli", None, params, prompt_token_ids=prompt_ids)
    else:
        llm.engine.add_request("cli", args.prompt, params)
    printed = [0] * params.n
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            for completion in output.outputs:
                if params.n == 1:
                    sys.stdout.write(completion.text[printed[0]:])
                    printed[0] = len(completion.text)
                elif completion.finished and printed[completion.index] == 0:
                    sys.stdout.write(f"--- sample {completion.index} ---\n{completion.text}\n")
                    printed[completion.index] = 1
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from hetserve.server.launch import run_server

    kwargs = engine_kwargs(args)
    if args.model_tag is not None:
        kwargs["model"] = args.model_tag
    server = collect(args, ServerConfig)
    server.setdefault("api_key", os.environ.get("HETSERVE_API_KEY") or None)
    run_server(EngineConfig.from_kwargs(**kwargs), ServerConfig(**server))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.command in ("serve", "quantize") or getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return {"generate": run_generate, "serve": run_serve, "bench": run_bench,
                "simulate": run_simulate, "plan": run_plan, "profile": run_profile,
                "quantize": run_quantize}[args.command](args)
    except ValueError as error:
        print(f"hetserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
