"""Does `hetserve simulate` predict what `hetserve bench` measures? For each plan (one worker; PP=2 in
two processes) a real server is started, each workload is sent to it with `hetserve bench`, and the same
workload is simulated with this machine's measured profile. Writes JSON and prints a Markdown table of
predicted and measured output throughput and median TPOT.

    .venv/bin/python benchmarks/simulator_validation.py --out results/simulator_validation.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hetserve.server.process import ServerProcess

PLANS = {"1 worker": [], "PP=2 (2 processes)": ["--pipeline-parallel-size", "2"]}
WORKLOADS = {
    "random": ["--workload", "random", "--random-input-len", "256", "--random-output-len", "64"],
    "chat": ["--workload", "chat", "--chat-input-len", "192", "--chat-output-len", "64", "--chat-sigma", "0.5"],
    "shared-prefix": ["--workload", "shared-prefix", "--prefix-len", "384", "--suffix-len", "32",
                      "--random-output-len", "64"],
}
KV_CACHE = ["--kv-cache-memory", "1GiB"]
# `simulate` plans bf16 weights unless told otherwise; the server would pick int4 for the Q4_1 GGUF.
FLOAT_WEIGHTS = ["--quantization", "none"]
WARMUP = ["--num-prompts", "8", "--max-concurrency", "8", "--random-input-len", "256", "--random-output-len", "8",
          "--seed", "1"]


def run_command(command: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "hetserve.cli", *command, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"][0]["summary"]


def compare(name: str, measured: dict, predicted: dict) -> dict:
    row = {"case": name}
    for key, value in (("output_throughput", lambda s: s["output_throughput"]),
                       ("median_tpot_ms", lambda s: s["tpot"]["median"]),
                       ("median_ttft_ms", lambda s: s["ttft"]["median"])):
        row[key] = {"measured": value(measured), "predicted": value(predicted),
                    "error": value(predicted) / value(measured) - 1}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--out", default="results/simulator_validation.json")
    args = parser.parse_args()
    common = ["--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
              "--tokenizer", "default", "--seed", "0"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for plan_name, plan_flags in PLANS.items():
            with ServerProcess(*KV_CACHE, *FLOAT_WEIGHTS, *plan_flags) as server:
                # Warm-up: the first prompts of a fresh server also pay one-time kernel setup.
                run_command(["bench", "--base-url", server.url, "--disable-tqdm", *WARMUP], Path(scratch) / "warmup.json")
                for workload, flags in WORKLOADS.items():
                    bench = ["bench", "--base-url", server.url, "--ignore-eos", "--disable-tqdm", *common, *flags]
                    measured = run_command(bench, Path(scratch) / "bench.json")
                    simulate = ["simulate", *KV_CACHE, *plan_flags, *common, *flags]
                    predicted = run_command(simulate, Path(scratch) / "sim.json")
                    rows.append(compare(f"{plan_name}, {workload}", measured, predicted))
                    print(json.dumps(rows[-1]), flush=True)
    print("\n| plan, workload | output tok/s measured | predicted | error | median TPOT ms measured | predicted "
          "| error |\n|---|---|---|---|---|---|---|")
    for row in rows:
        tput, tpot = row["output_throughput"], row["median_tpot_ms"]
        print(f"| {row['case']} | {tput['measured']:.1f} | {tput['predicted']:.1f} | {tput['error']:+.1%} | "
              f"{tpot['measured']:.1f} | {tpot['predicted']:.1f} | {tpot['error']:+.1%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "args": vars(args), "rows": rows},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
