"""FCFS against FastServe's skip-join MLFQ on a mixed workload: many short requests with a few very
long ones among them, arriving as a Poisson process at a rate the server can just keep up with.

Each policy gets a fresh server (same model, same slots, same KV cache) and the same requests from
`hetserve bench --workload mixed`; short and long requests are then summarised apart (median and p99
end-to-end latency and TTFT), since MLFQ's point is that short requests stop waiting behind long ones.

    .venv/bin/python benchmarks/scheduling_policies.py --out results/scheduling_policies.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from hetserve.server.process import ServerProcess

SHORT = {"input": 32, "output": 16}
LONG = {"input": 1024, "output": 256}


def bench(url: str, args: argparse.Namespace, out: Path, seed: int, num_prompts: int, rate: str) -> dict:
    command = [sys.executable, "-m", "hetserve.cli", "bench", "--base-url", url, "--tokenizer", "default",
               "--ignore-eos", "--disable-tqdm", "--workload", "mixed", "--num-prompts", str(num_prompts),
               "--request-rate", rate, "--seed", str(seed),
               "--random-input-len", str(SHORT["input"]), "--random-output-len", str(SHORT["output"]),
               "--long-context-len", str(LONG["input"]), "--mixed-long-output-len", str(LONG["output"]),
               "--mixed-long-fraction", str(args.long_fraction), "--out", str(out)]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"][0]


def latency_summary(requests: list[dict]) -> dict:
    done = [r for r in requests if r["success"]]
    if not done:
        return {"count": 0, "failed": len(requests)}
    e2e = np.array([r["e2e"] for r in done]) * 1000
    ttft = np.array([r["ttft"] for r in done]) * 1000
    return {"count": len(done), "failed": len(requests) - len(done),
            "median_e2e_ms": float(np.median(e2e)), "p99_e2e_ms": float(np.percentile(e2e, 99)),
            "median_ttft_ms": float(np.median(ttft)), "p99_ttft_ms": float(np.percentile(ttft, 99))}


def run_policy(policy: str, args: argparse.Namespace, logs: Path) -> dict:
    flags = ["--scheduling-policy", policy, "--max-num-seqs", str(args.max_num_seqs),
             "--kv-cache-memory", "1GiB", "--max-model-len", "2048"]
    with ServerProcess(*flags) as server:
        bench(server.url, args, logs / f"{policy}-warmup.json", seed=1, num_prompts=4, rate="inf")
        run = bench(server.url, args, logs / f"{policy}.json", seed=0, num_prompts=args.num_prompts,
                    rate=str(args.request_rate))
    requests = run["requests"]
    short = [r for r in requests if r["prompt_len"] <= 2 * SHORT["input"]]
    long = [r for r in requests if r["prompt_len"] > 2 * SHORT["input"]]
    result = {"policy": policy, "server_flags": flags, "short": latency_summary(short),
              "long": latency_summary(long), "output_throughput": run["summary"]["output_throughput"],
              "duration_s": run["summary"]["duration_s"]}
    print(f"{policy}: short median/p99 e2e {result['short'].get('median_e2e_ms', 0):.0f}/"
          f"{result['short'].get('p99_e2e_ms', 0):.0f} ms, long median e2e "
          f"{result['long'].get('median_e2e_ms', 0):.0f} ms, {result['output_throughput']:.1f} tok/s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--request-rate", type=float, default=2.0)
    parser.add_argument("--long-fraction", type=float, default=0.1)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--policies", default="fcfs,mlfq")
    parser.add_argument("--out", type=Path, default=Path("results/scheduling_policies.json"))
    args = parser.parse_args()
    logs = args.out.with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    results = [run_policy(policy, args, logs) for policy in args.policies.split(",")]
    report = {"benchmark": "scheduling_policies", "machine": platform.machine(), "short": SHORT, "long": LONG,
              "num_prompts": args.num_prompts, "request_rate": args.request_rate,
              "long_fraction": args.long_fraction, "max_num_seqs": args.max_num_seqs, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
