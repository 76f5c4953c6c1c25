"""hetserve beside llama.cpp's llama-server (and vLLM's CPU build) on this CPU: the same GGUF file
(for vLLM, its weights exported to a bf16 Hugging Face directory), the same thread count, the same
workloads, the same client (`hetserve bench`).

For each concurrency, each server is started fresh (llama-server with one slot per concurrent
request), checked for protocol compatibility, warmed up, and sent every workload (random: 256
tokens in, 128 out; shared-prefix: a 512-token prefix + 32-token suffixes, 128 out; EOS ignored).
Writes one JSON with every run and prints a Markdown table; also measures this CPU's bf16 matmul
roofline and the fraction of it hetserve reaches at the largest concurrency.

    benchmarks/install_llama_server.sh       # once: builds $HETSERVE_PEERS/llama-server
    benchmarks/install_vllm_cpu.sh           # once, optional: $HETSERVE_PEERS/vllm-venv
    .venv/bin/python benchmarks/serving_peers.py --out results/serving_peers.json
    .venv/bin/python benchmarks/serving_peers.py --servers hetserve,llama-server,vllm --out results/peers3.json
    .venv/bin/python benchmarks/serving_peers.py --concurrency 1,8 --num-prompts 8   # a short run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hetserve.server.process import ChildServer, ServerProcess

PEERS = Path(os.environ.get("HETSERVE_PEERS", Path.home() / ".cache/hetserve/peers"))
OUTPUT_LEN = 128
WORKLOADS = {
    "random": ["--workload", "random", "--random-input-len", "256", "--random-range-ratio", "0"],
    "shared-prefix": ["--workload", "shared-prefix", "--prefix-len", "512", "--suffix-len", "32"],
}
WARMUP = ["--workload", "random", "--random-input-len", "64", "--random-output-len", "8", "--seed", "1"]


class LlamaServer(ChildServer):
    """llama-server on a free loopback port, one slot per concurrent request; its log goes to `log`."""

    def __init__(self, binary: Path, model: Path, threads: int, slots: int, slot_context: int, log: Path,
                 extra: list[str] = (), startup_timeout: float = 300):
        super().__init__(lambda port: [
            str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(slots), "-c", str(slots * slot_context), "--cont-batching", *extra],
            startup_timeout, log_path=log)


class VllmServer(ChildServer):
    """vLLM's OpenAI server (its CPU build, from `python`'s environment) on a free loopback port, bf16,
    on `threads` cores; offline (HF_HUB_OFFLINE), with `kv_cache_gib` of KV cache."""

    def __init__(self, python: Path, model_dir: Path, threads: int, log: Path, kv_cache_gib: int = 2,
                 startup_timeout: float = 600):
        super().__init__(lambda port: [
            "env", "HF_HUB_OFFLINE=1", f"VLLM_CPU_KVCACHE_SPACE={kv_cache_gib}",
            f"VLLM_CPU_OMP_THREADS_BIND=0-{threads - 1}", str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
            "--max-model-len", "2048"], startup_timeout, log_path=log)


def bf16_hf_directory(gguf: Path, directory: Path) -> Path:
    """The GGUF's weights as transformers dequantizes them, in bf16, saved as a Hugging Face directory
    (config, safetensors, tokenizer) for servers that do not read GGUF on the CPU. Made once."""
    if (directory / "model.safetensors").is_file():
        return directory
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    directory.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    # transformers refuses to save a model it loaded from GGUF; its tensors and config are plain, though.
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    del model.config.quantization_config
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


CHECK_MAX_TOKENS = 128  # the greedy answer to "Say hello." ends by EOS well before this in both servers


def check_protocol(url: str) -> dict:
    """Does the server honour what `hetserve bench` sends? Streamed requests with
    `stream_options.include_usage`, as the client sends them: a chat question the model answers in a few
    tokens must stop early without `ignore_eos` and run to max_completion_tokens with it; a completion
    with `ignore_eos` must give max_tokens; usage must come in the stream and match the streamed text."""
    model = httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"]
    chat = {"messages": [{"role": "user", "content": "Say hello."}], "max_completion_tokens": CHECK_MAX_TOKENS}
    completion = {"prompt": "The capital of France is", "max_tokens": CHECK_MAX_TOKENS, "ignore_eos": True}
    legs = {"chat": ("/v1/chat/completions", chat), "chat ignore_eos": ("/v1/chat/completions",
            {**chat, "ignore_eos": True}), "completion ignore_eos": ("/v1/completions", completion)}
    report = {"model": model}
    for name, (endpoint, fields) in legs.items():
        body = {"model": model, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                **fields}
        report[name] = stream_once(f"{url}{endpoint}", body)
    lengths = {leg: (report[leg].get("usage") or {}).get("completion_tokens") for leg in legs}
    report["ignore_eos_honoured"] = (lengths["chat"] is not None and lengths["chat"] < CHECK_MAX_TOKENS
                                     and lengths["chat ignore_eos"] == lengths["completion ignore_eos"]
                                     == CHECK_MAX_TOKENS)
    report["usage_in_stream"] = all(report[leg].get("usage") for leg in legs)
    return report


def stream_once(url: str, body: dict) -> dict:
    """What one streamed request delivered: status, chunks carrying text, finish reason, [DONE], usage."""
    chunks, usage, finish, done = 0, None, None, False
    with httpx.stream("POST", url, json=body, timeout=300, trust_env=False) as response:
        if response.status_code != 200:
            return {"http_status": response.status_code, "body": response.read().decode()[:300]}
        for line in response.iter_lines():
            data = line[len("data:"):].strip() if line.startswith("data:") else ""
            if data == "[DONE]":
                done = True
            elif data:
                event = json.loads(data)
                choice = (event.get("choices") or [{}])[0]
                chunks += bool(choice.get("text") or (choice.get("delta") or {}).get("content"))
                finish = choice.get("finish_reason") or finish
                usage = event.get("usage") or usage
    return {"http_status": 200, "chunks_with_text": chunks, "finish_reason": finish, "done": done,
            "usage": usage and {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}}


def bench(url: str, concurrency: int, num_prompts: int, flags: list[str], out: Path, log: Path) -> dict:
    command = [sys.executable, "-m", "hetserve.cli", "bench", "--base-url", url, "--endpoint", "/v1/completions",
               "--tokenizer", "default", "--ignore-eos", "--disable-tqdm", "--request-rate", "inf",
               "--max-concurrency", str(concurrency), "--num-prompts", str(num_prompts),
               "--random-output-len", str(OUTPUT_LEN), *flags, "--out", str(out)]
    with open(log, "a") as log_file:
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    run = json.loads(out.read_text())["runs"][0]
    done = [r for r in run["requests"] if r["success"]]
    summary = run["summary"]
    return {"output_throughput": summary["output_throughput"], "completed": summary["completed"],
            "failed": summary["failed"], "duration_s": summary["duration_s"],
            "total_input_tokens": summary["total_input_tokens"],
            "total_output_tokens": summary["total_output_tokens"],
            "median_ttft_ms": summary["ttft"]["median"], "p99_ttft_ms": summary["ttft"]["p99"],
            "median_tpot_ms": summary["tpot"]["median"], "median_itl_ms": summary["itl"]["median"],
            # One streamed chunk per token, and usage counting exactly max_tokens: the client's numbers are right.
            "outputs_exact": all(r["output_tokens"] == OUTPUT_LEN for r in done),
            "chunks_per_token": sum(len(r["itl"]) + 1 for r in done) / max(1, summary["total_output_tokens"]),
            "errors": sorted({r["error"] for r in run["requests"] if not r["success"]}),
            "bench_json": str(out)}


def serve_and_bench(name: str, start, concurrency: int, args: argparse.Namespace, logs: Path) -> dict:
    started = time.perf_counter()
    with start() as server:
        result = {"server": name, "concurrency": concurrency, "startup_s": time.perf_counter() - started,
                  # Something else running shows here (this machine is shared): compare only quiet runs.
                  "load_average_at_start": os.getloadavg()[0],
                  "command": server.process.args, "protocol": check_protocol(server.url), "runs": {}}
        prefix = logs / f"{name}-c{concurrency}"
        bench(server.url, concurrency, concurrency, WARMUP, Path(f"{prefix}-warmup.json"), Path(f"{prefix}-bench.log"))
        for workload, flags in WORKLOADS.items():
            run = bench(server.url, concurrency, max(args.min_prompts, args.prompts_per_slot * concurrency),
                        [*flags, "--seed", "0"], Path(f"{prefix}-{workload}.json"), Path(f"{prefix}-bench.log"))
            result["runs"][workload] = run
            print(f"{name} c={concurrency} {workload}: {run['output_throughput']:.1f} tok/s, median TTFT "
                  f"{run['median_ttft_ms']:.0f} ms, median TPOT {run['median_tpot_ms']:.1f} ms", flush=True)
    return result


def roofline(threads: int) -> dict:
    """Best FLOP/s of a bf16 `linear` (y = x W^T) over a few large square shapes, all threads."""
    import torch

    torch.set_num_threads(threads)
    best = {}
    for n in (1024, 2048, 4096):
        x, w = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        torch.nn.functional.linear(x, w)  # warm-up: oneDNN picks and builds its kernel
        seconds = []
        for _ in range(5 if n < 4096 else 3):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            seconds.append(time.perf_counter() - start)
        best[n] = 2 * n**3 / min(seconds)
    return {"threads": threads, "flops_by_size": best, "peak_flops": max(best.values())}


def flops_per_token(model: Path) -> dict:
    """2 x the parameters every token multiplies by: the decoder layers and the LM head (attention over
    the context is left out: at these lengths it is a few percent)."""
    from hetserve.model.loader import load_spec
    from hetserve.planner.cost_model import ModelShape

    shape = ModelShape.from_spec(load_spec(model))
    params = shape.num_layers * shape.layer_params + shape.vocab_size * shape.hidden_size
    return {"matmul_params": params, "flops_per_token": 2 * params}


def efficiency(runs: list[dict], model_flops: dict, peak: float) -> list[dict]:
    top = max(r["concurrency"] for r in runs)
    rows = []
    for result in (r for r in runs if r["concurrency"] == top):
        for workload, run in result["runs"].items():
            output = run["output_throughput"] * model_flops["flops_per_token"]
            every = output * (1 + run["total_input_tokens"] / run["total_output_tokens"])
            rows.append({"server": result["server"], "workload": workload, "concurrency": top,
                         "output_flops": output, "fraction_of_peak": output / peak,
                         # Prompt tokens too (an upper bound: prefix caching skips part of them).
                         "fraction_of_peak_with_prompts": every / peak})
    return rows


COLUMNS = (("output_throughput", "tok/s", ".1f"), ("median_ttft_ms", "median TTFT ms", ".0f"),
           ("median_tpot_ms", "median TPOT ms", ".1f"))


def table(runs: list[dict]) -> str:
    """Rows: workload x concurrency; per metric a column per server, and after the throughputs the
    ratio of hetserve's to each peer's."""
    by_key = {(r["server"], r["concurrency"], w): run for r in runs for w, run in r["runs"].items()}
    servers = list(dict.fromkeys(r["server"] for r in runs))
    peers = [server for server in servers if server != "hetserve"]
    header = ["workload", "concurrency", *(f"{server} tok/s" for server in servers)]
    header += [f"ratio vs {peer}" for peer in peers if "hetserve" in servers]
    header += [f"{server} {title}" for _, title, _ in COLUMNS[1:] for server in servers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload in WORKLOADS:
        for concurrency in sorted({r["concurrency"] for r in runs}):
            row = {server: by_key.get((server, concurrency, workload)) for server in servers}
            cells = [[format(run[key], fmt) if run else "-" for run in row.values()] for key, _, fmt in COLUMNS]
            ours = row.get("hetserve")
            ratios = [f"{ours['output_throughput'] / row[peer]['output_throughput']:.2f}x" if ours and row[peer]
                      else "-" for peer in peers] if "hetserve" in servers else []
            row_cells = [workload, str(concurrency), *cells[0], *ratios, *cells[1], *cells[2]]
            lines.append("| " + " | ".join(row_cells) + " |")
    return "\n".join(lines)


def llama_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return " ".join(line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("version", "built")))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32", help="Comma-separated max concurrencies.")
    parser.add_argument("--prompts-per-slot", type=int, default=4, help="Prompts per run: this x concurrency ...")
    parser.add_argument("--min-prompts", "--num-prompts", type=int, default=8, help="... but at least this many.")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads of both servers.")
    parser.add_argument("--slot-context", type=int, default=1024, help="llama-server context tokens per slot.")
    parser.add_argument("--servers", default="hetserve,llama-server",
                        help="Which servers to run, of hetserve, llama-server and vllm.")
    parser.add_argument("--hetserve-args", default="", help="Extra `hetserve serve` flags, one shell string.")
    parser.add_argument("--llama-args", default="", help="Extra llama-server flags, one shell string.")
    parser.add_argument("--llama-server", type=Path, default=PEERS / "llama-server")
    parser.add_argument("--vllm-python", type=Path, default=PEERS / "vllm-venv/bin/python",
                        help="Python of the environment benchmarks/install_vllm_cpu.sh made.")
    parser.add_argument("--out", type=Path, default=Path("results/serving_peers.json"))
    parser.add_argument("--log-dir", type=Path, default=None, help="Server and bench logs; default: next to --out.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so every `with` stops its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # hetserve's torch and OpenMP threads; llama-server gets -t. Set before torch is imported anywhere.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from hetserve.model.loader import resolve_model_path

    model = resolve_model_path(None)
    servers = args.servers.split(",")
    if "llama-server" in servers and not args.llama_server.is_file():
        sys.exit(f"{args.llama_server} not found: run benchmarks/install_llama_server.sh first")
    if "vllm" in servers and not args.vllm_python.is_file():
        sys.exit(f"{args.vllm_python} not found: run benchmarks/install_vllm_cpu.sh first")
    logs = args.log_dir or args.out.parent / f"{args.out.stem}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    starters = {
        "hetserve": lambda c: lambda: ServerProcess(*shlex.split(args.hetserve_args)),
        "llama-server": lambda c: lambda: LlamaServer(args.llama_server, model, args.threads, c, args.slot_context,
                                                      logs / f"llama-server-c{c}.log", shlex.split(args.llama_args)),
        "vllm": lambda c: lambda: VllmServer(args.vllm_python, bf16_hf_directory(model, PEERS / "smollm2-bf16-hf"),
                                             args.threads, logs / f"vllm-c{c}.log"),
    }
    # Each server stops when its `with` ends, or when its own start is interrupted (ChildServer).
    runs = [serve_and_bench(name, starters[name](concurrency), concurrency, args, logs)
            for concurrency in map(int, args.concurrency.split(",")) for name in servers]
    peak, model_flops = roofline(args.threads), flops_per_token(model)
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "threads": args.threads},
              "model": str(model), "args": {k: str(v) for k, v in vars(args).items()},
              "llama_server_version": llama_version(args.llama_server) if "llama-server" in servers else None,
              "roofline": peak, "model_flops": model_flops,
              "efficiency": efficiency(runs, model_flops, peak["peak_flops"]), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"wrote {args.out}")


def print_report(report: dict) -> None:
    runs, peak, model_flops = report["runs"], report["roofline"], report["model_flops"]
    print("\n" + table(runs))
    print(f"\nbf16 linear roofline: {peak['peak_flops'] / 1e9:.0f} GFLOP/s on {peak['threads']} threads; "
          f"model: {model_flops['flops_per_token'] / 1e6:.0f} MFLOP per token")
    for row in report["efficiency"]:
        print(f"{row['server']} {row['workload']} c={row['concurrency']}: {row['output_flops'] / 1e9:.1f} GFLOP/s "
              f"of output tokens = {row['fraction_of_peak']:.1%} of peak ({row['fraction_of_peak_with_prompts']:.1%} "
              "counting prompt tokens)")
    for result in runs:
        for workload, run in result["runs"].items():
            if run["failed"] or not run["outputs_exact"]:
                print(f"WARNING: {result['server']} c={result['concurrency']} {workload}: {run['failed']} failed "
                      f"{run['errors']}, every output {OUTPUT_LEN} tokens: {run['outputs_exact']}")
        protocol = result["protocol"]
        print(f"{result['server']} c={result['concurrency']}: ignore_eos honoured: {protocol['ignore_eos_honoured']}, "
              f"usage in stream: {protocol['usage_in_stream']}")


if __name__ == "__main__":
    main()
