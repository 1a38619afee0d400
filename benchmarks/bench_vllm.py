"""Serving throughput: vLLM's OpenAI server vs the transformers pipeline, side by side in one run.

Both answer the same held-out shapes-and-words chats (seed 777, greedy, up to 48 new tokens) with the shipped
tiny checkpoint: vLLM at 1, 8 and 32 concurrent requests (OpenAI client threads against `127.0.0.1`), the
pipeline `pipeline("image-text-to-text")` at batch size 1, 8 and 32. The levels are interleaved (pipeline 1,
vLLM 1, pipeline 8, ... each round), so machine load hits both alike; read the ratios.

vLLM and transformers>=5.24 cannot share an environment (vLLM pins an older transformers), so this script runs in
the vLLM environment, starts the server, and drives a pipeline worker in the main environment over stdin/stdout:

    .venv-vllm/bin/python benchmarks/bench_vllm.py --transformers-python .venv/bin/python --out benchmarks/results.vllm.cpu.json

Tensor parallelism: `--tensor-parallel-sizes 1 2 --no-pipeline` starts one server per size, side by side, and
interleaves them the same way (on CPU each rank of a multi-rank server is bound to its own core through
`VLLM_CPU_OMP_THREADS_BIND`, as README documents):

    .venv-vllm/bin/python benchmarks/bench_vllm.py --tensor-parallel-sizes 1 2 --no-pipeline --out benchmarks/results.vllm.tp.cpu.json

Output tokens are counted the same way for both (tokens of the answer text + 1 end-of-turn token).
Peak memory is VmHWM (peak resident set), of the pipeline worker and of each server process (API server, engine
core, one worker per rank), summed per server.
"""

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "florence-vl-tiny-shapes"
MODEL = "florence-vl-tiny-shapes"
SEED, MAX_NEW_TOKENS = 777, 48


def chats(n: int):
    from florence_vl.train.shapes import make_examples

    return [(example["images"][0], example["messages"][0]["content"][1]["text"])
            for example in make_examples(n, SEED, "heldout")]


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- pipeline worker (main environment)
def pipeline_worker(n: int) -> None:
    """Reads a batch size per line from stdin, answers the n chats at that batch size, prints one JSON line."""
    import torch
    import transformers
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(CHECKPOINT), trust_remote_code=True, dtype=torch.float32)
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]}]
                     for image, q in chats(n)]
    print(json.dumps({"ready": True, "transformers": transformers.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        batch_size = int(line)
        start = time.perf_counter()
        outputs = pipe(text=conversations, batch_size=batch_size, return_full_text=False,
                       generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False})
        seconds = time.perf_counter() - start
        answers = [output[0]["generated_text"] for output in outputs]
        tokens = sum(len(pipe.processor.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
        print(json.dumps({"seconds": seconds, "tokens": tokens, "answers": answers,
                          "peak_mb": vm_hwm_mb(os.getpid())}), flush=True)


# ---------------------------------------------------------------- orchestrator (vLLM environment)
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, kv_cache_bytes: int, log_path: Path, tensor_parallel_size: int = 1) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(CHECKPOINT),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--kv-cache-memory-bytes", str(kv_cache_bytes), "--limit-mm-per-prompt", '{"image": 2}', "--seed", "0",
               "--tensor-parallel-size", str(tensor_parallel_size)]  # README's memory flags
    env = dict(os.environ)
    if tensor_parallel_size > 1:  # one core per rank (README "Tensor parallelism")
        cpus = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cpu) for cpu in cpus[:tensor_parallel_size])
    return subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)


def wait_ready(client, process, timeout: float = 900) -> None:
    import openai

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode}; see its log")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def tree_peaks_mb(pid: int) -> dict[str, float]:
    """VmHWM of the server and every process it started, by process name (VLLM::Worker_TP0, ...)."""
    import psutil

    root = psutil.Process(pid)
    return {f"{process.name()} ({process.pid})": vm_hwm_mb(process.pid)
            for process in [root, *root.children(recursive=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="python of an environment with florence-vl and transformers>=5.24")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--n", type=int, default=64, help="chats per level and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-bytes", type=int, default=2**30, help="per rank")
    parser.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[1],
                        help="one vLLM server per size, measured side by side")
    parser.add_argument("--no-pipeline", action="store_true", help="measure only the vLLM servers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.vllm.cpu.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return pipeline_worker(args.n)

    import openai
    import transformers
    import vllm
    from transformers import AutoTokenizer

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = None if args.no_pipeline else subprocess.Popen(
        [args.transformers_python, __file__, "--worker", "--n", str(args.n)], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    names = {size: "vllm" if size == 1 else f"vllm_tp{size}" for size in args.tensor_parallel_sizes}
    servers, clients = {}, {}
    for size, name in names.items():
        port = free_port()
        log_path = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "server.log"
        print(f"{name}: log {log_path}", file=sys.stderr, flush=True)
        servers[name] = start_server(port, args.kv_cache_bytes, log_path, size)
        clients[name] = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0,
                                      timeout=600)
    try:
        worker_info = json.loads(worker.stdout.readline()) if worker else None
        for name in servers:
            wait_ready(clients[name], servers[name])
        tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
        requests = []
        for image, question in chats(args.n):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            requests.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": question}]}])

        def ask(client, messages) -> str:
            response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0,
                                                      max_tokens=MAX_NEW_TOKENS)
            return response.choices[0].message.content

        for name in servers:
            ask(clients[name], requests[0])  # warm-up (first multimodal request)
        engines = ([] if args.no_pipeline else ["pipeline"]) + list(servers)
        runs = {name: {level: [] for level in args.levels} for name in engines}
        answers = {}
        for round_index in range(args.rounds):
            for level in args.levels:
                timings = []
                if worker:
                    worker.stdin.write(f"{level}\n")
                    worker.stdin.flush()
                    result = json.loads(worker.stdout.readline())
                    answers["pipeline"] = result.pop("answers")
                    runs["pipeline"][level].append(result)
                    timings.append(f"pipeline {result['seconds']:.2f} s")
                for name, client in clients.items():
                    start = time.perf_counter()
                    with ThreadPoolExecutor(level) as pool:
                        texts = list(pool.map(lambda messages: ask(client, messages), requests))
                    seconds = time.perf_counter() - start
                    answers[name] = texts
                    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
                    runs[name][level].append({"seconds": seconds, "tokens": tokens})
                    timings.append(f"{name} {seconds:.2f} s")
                print(f"round {round_index} level {level}: " + ", ".join(timings), file=sys.stderr, flush=True)
        peaks = {name: tree_peaks_mb(server.pid) for name, server in servers.items()}
        peaks = {name: {"total": sum(processes.values()), "processes": processes} for name, processes in peaks.items()}
        if worker:
            peaks["pipeline"] = {"total": runs["pipeline"][args.levels[-1]][-1]["peak_mb"]}
    finally:
        if worker:
            worker.stdin.close()
            worker.wait(timeout=60)
        for server in servers.values():
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=120)

    reference = "pipeline" if worker else "vllm" if "vllm" in servers else None
    table = []
    for level in args.levels:
        row = {"level": level}
        for name in engines:
            rps = [args.n / run["seconds"] for run in runs[name][level]]
            tps = [run["tokens"] / run["seconds"] for run in runs[name][level]]
            row[name] = {"requests_per_s": statistics.median(rps), "output_tokens_per_s": statistics.median(tps)}
        if worker and "vllm" in servers:
            row["ratio_requests_per_s"] = row["vllm"]["requests_per_s"] / row["pipeline"]["requests_per_s"]
        for name in servers:
            if name != "vllm" and "vllm" in servers:
                row[f"ratio_{name}_vs_vllm"] = row[name]["requests_per_s"] / row["vllm"]["requests_per_s"]
        table.append(row)
    equal = {name: f"{sum(a == b for a, b in zip(answers[reference], answers[name]))}/{args.n}"
             for name in engines if reference and name != reference}
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "versions": {"vllm": vllm.__version__, "transformers_vllm_env": transformers.__version__,
                     "pipeline_env": worker_info},
        "settings": {"n": args.n, "rounds": args.rounds, "max_new_tokens": MAX_NEW_TOKENS, "seed": SEED,
                     "kv_cache_bytes_per_rank": args.kv_cache_bytes, "dtype": "float32",
                     "tensor_parallel_sizes": args.tensor_parallel_sizes},
        "table": table, "peak_memory_mb": peaks, "runs": runs,
        f"equal_answers_last_level_vs_{reference}": equal,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| concurrency / batch | " + " | ".join(f"{name} req/s" for name in engines) + " | "
          + " | ".join(f"{name} tok/s" for name in engines) + " |")
    for row in table:
        print(f"| {row['level']} | " + " | ".join(f"{row[name]['requests_per_s']:.2f}" for name in engines) + " | "
              + " | ".join(f"{row[name]['output_tokens_per_s']:.1f}" for name in engines) + " |")
    print("peak memory (MB): " + ", ".join(f"{name} {peak['total']:.0f}" for name, peak in peaks.items())
          + f"; equal answers (last level) vs {reference}: {equal}")


if __name__ == "__main__":
    main()
