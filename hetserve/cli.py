"""`hetserve generate ...`: command-line entry point. Flags come from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from hetserve.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig
from hetserve.sampling_params import SamplingParams

ENGINE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, DeviceConfig)
SAMPLING_FLAGS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "ignore_eos",
                  "logprobs", "skip_special_tokens")
SAMPLING_HELP = {
    "temperature": "Sampling temperature; 0 is greedy (the default here).",
    "stop": "Stop string (repeat the flag for several).",
    "seed": "Seed of this request's sampler.",
    "max_tokens": "Most tokens to generate.",
}


def _flag_type(annotation: str):
    for name, kind in (("bool", bool), ("int | str", str), ("float", float), ("int", int)):
        if annotation.startswith(name):
            return kind
    return str


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, only: Sequence[str] | None = None,
                        help_overrides: dict[str, str] | None = None) -> None:
    """One --flag per dataclass field, documented by the field's `help` metadata."""
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        if only is not None and field.name not in only:
            continue
        flag = "--" + field.name.replace("_", "-")
        text = (help_overrides or {}).get(field.name) or field.metadata.get("help", "")
        kind = _flag_type(str(field.type))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif field.name == "stop":
            group.add_argument(flag, action="append", default=None, help=text)
        else:
            group.add_argument(flag, type=kind, default=None, help=text)


def collect(args: argparse.Namespace, cls) -> dict:
    """The flags of `cls` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {}
    for cls in ENGINE_CONFIGS:
        kwargs.update(collect(args, cls))
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="Generate text for one prompt, streamed to stdout.")
    generate.add_argument("--prompt", required=True, help="The prompt text.")
    generate.add_argument("--chat", action="store_true",
                          help="Send the prompt as a user message through the model's chat template.")
    generate.add_argument("--system", default=None, help="System message (with --chat).")
    generate.add_argument("-v", "--verbose", action="store_true", help="Log engine details to stderr.")
    for cls in ENGINE_CONFIGS:
        add_dataclass_flags(generate, cls)
    add_dataclass_flags(generate, SamplingParams, SAMPLING_FLAGS, SAMPLING_HELP)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return {"generate": run_generate}[args.command](args)
    except ValueError as error:
        print(f"hetserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
