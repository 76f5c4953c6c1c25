"""Time one decode step of the engine at several batch sizes, with hetserve's CPU kernels and without
(HETSERVE_CPU_KERNELS=0: PyTorch ops only), each in a fresh process, one after the other.

    .venv/bin/python benchmarks/decode_step.py --out results/decode_step.json
    .venv/bin/python benchmarks/decode_step.py --batch-sizes 1 --quantization int4

A step is LLMEngine.step() once every request is decoding (prompts of --prompt-len tokens); the
figure is the median over --steps steps. One more run, `other-thread`, steps the engine from a thread
other than the one that loaded the model, as a server did before AsyncEngine built its engine on
its own thread (libgomp then keeps two thread pools and stops spin-waiting between parallel ops)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def measure(batch: int, prompt_len: int, steps: int, quantization: str | None, other_thread: bool) -> dict:
    import torch

    from hetserve import LLM, SamplingParams

    llm = LLM(kv_cache_memory="1GiB", quantization=quantization)
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    prompts = [list(range(100 + i, 100 + i + prompt_len)) for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4))  # compiles the kernels, warms up
    times: list[float] = []

    def run() -> None:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), None, params, prompt_token_ids=prompt)
        while engine.scheduler.waiting or any(not r.output_token_ids for r in engine.scheduler.running):
            engine.step()
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)

    if other_thread:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    else:
        run()
    step = statistics.median(times[:-1])  # the last step finishes every request at once
    return {"batch": batch, "step_ms": step * 1e3, "tokens_per_s": batch / step, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch, other_thread = args.child.split(":")
        print(json.dumps(measure(int(batch), args.prompt_len, args.steps, args.quantization, other_thread == "1")))
        return

    runs = [("kernels", "1", False), ("pytorch-ops", "0", False)]
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for name, kernels, other_thread in runs + ([("other-thread", "1", True)] if batch == 1 else []):
            command = [sys.executable, __file__, "--child", f"{batch}:{int(other_thread)}",
                       "--prompt-len", str(args.prompt_len), "--steps", str(args.steps)]
            if args.quantization:
                command += ["--quantization", args.quantization]
            env = dict(os.environ, HETSERVE_CPU_KERNELS=kernels)
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            result = {"run": name, **json.loads(output.strip().splitlines()[-1])}
            results.append(result)
            print(f"batch {batch:3d} {name:12s} step {result['step_ms']:7.2f} ms  {result['tokens_per_s']:7.1f} tok/s",
                  flush=True)
    report = {"benchmark": "decode_step", "prompt_len": args.prompt_len, "quantization": args.quantization,
              "machine": platform.machine(), "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
