"""Serving throughput: vLLM's OpenAI server vs the transformers pipeline, side by side in one run.

Both answer the same held-out shapes-and-words chats (seed 777, greedy, up to 48 new tokens) with the shipped
tiny checkpoint: vLLM at 1, 8 and 32 concurrent requests (OpenAI client threads against `127.0.0.1`), the
pipeline `pipeline("image-text-to-text")` at batch size 1, 8 and 32. The levels are interleaved (pipeline 1,
vLLM 1, pipeline 8, ... each round), so machine load hits both alike; read the ratios.

vLLM and transformers>=5.24 cannot share an environment (vLLM pins an older transformers), so this script runs in
the vLLM environment, starts the server, and drives a pipeline worker in the main environment over stdin/stdout:

    .venv-vllm/bin/python benchmarks/bench_vllm.py --transformers-python .venv/bin/python --out benchmarks/results.vllm.cpu.json

Output tokens are counted the same way for both (tokens of the answer text + 1 end-of-turn token).
Peak memory is VmHWM (peak resident set), of the pipeline worker and summed over the server's processes.
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


def start_server(port: int, kv_cache_bytes: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(CHECKPOINT),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(kv_cache_bytes),
               "--max-num-seqs", "64", "--seed", "0"]
    return subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)


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


def tree_peak_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(vm_hwm_mb(process.pid) for process in [root, *root.children(recursive=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="python of an environment with florence-vl and transformers>=5.24")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--n", type=int, default=64, help="chats per level and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-bytes", type=int, default=2**30)
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
    worker = subprocess.Popen([args.transformers_python, __file__, "--worker", "--n", str(args.n)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    port = free_port()
    server = start_server(port, args.kv_cache_bytes, Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "server.log")
    try:
        worker_info = json.loads(worker.stdout.readline())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0,
                               timeout=600)
        wait_ready(client, server)
        tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
        requests = []
        for image, question in chats(args.n):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            requests.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": question}]}])

        def ask(messages) -> str:
            response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0,
                                                      max_tokens=MAX_NEW_TOKENS)
            return response.choices[0].message.content

        ask(requests[0])  # warm-up (first multimodal request)
        runs = {"pipeline": {level: [] for level in args.levels}, "vllm": {level: [] for level in args.levels}}
        answers = {}
        for round_index in range(args.rounds):
            for level in args.levels:
                worker.stdin.write(f"{level}\n")
                worker.stdin.flush()
                result = json.loads(worker.stdout.readline())
                answers["pipeline"] = result.pop("answers")
                runs["pipeline"][level].append(result)
                start = time.perf_counter()
                with ThreadPoolExecutor(level) as pool:
                    texts = list(pool.map(ask, requests))
                seconds = time.perf_counter() - start
                answers["vllm"] = texts
                tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
                runs["vllm"][level].append({"seconds": seconds, "tokens": tokens})
                print(f"round {round_index} level {level}: pipeline {result['seconds']:.2f} s, vLLM {seconds:.2f} s",
                      file=sys.stderr, flush=True)
        peaks = {"pipeline": runs["pipeline"][args.levels[-1]][-1]["peak_mb"], "vllm": tree_peak_mb(server.pid)}
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=120)

    table = []
    for level in args.levels:
        row = {"level": level}
        for name in ("pipeline", "vllm"):
            rps = [args.n / run["seconds"] for run in runs[name][level]]
            tps = [run["tokens"] / run["seconds"] for run in runs[name][level]]
            row[name] = {"requests_per_s": statistics.median(rps), "output_tokens_per_s": statistics.median(tps)}
        row["ratio_requests_per_s"] = row["vllm"]["requests_per_s"] / row["pipeline"]["requests_per_s"]
        table.append(row)
    equal = sum(a == b for a, b in zip(answers["pipeline"], answers["vllm"]))
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "versions": {"vllm": vllm.__version__, "transformers_vllm_env": transformers.__version__,
                     "pipeline_env": worker_info},
        "settings": {"n": args.n, "rounds": args.rounds, "max_new_tokens": MAX_NEW_TOKENS, "seed": SEED,
                     "kv_cache_bytes": args.kv_cache_bytes, "dtype": "float32"},
        "table": table, "peak_memory_mb": peaks, "runs": runs,
        "equal_answers_last_level": f"{equal}/{args.n}",
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| concurrency / batch | pipeline req/s | vLLM req/s | ratio | pipeline tok/s | vLLM tok/s |")
    print("|---|---|---|---|---|---|")
    for row in table:
        p, v = row["pipeline"], row["vllm"]
        print(f"| {row['level']} | {p['requests_per_s']:.2f} | {v['requests_per_s']:.2f} | "
              f"{row['ratio_requests_per_s']:.2f}x | {p['output_tokens_per_s']:.1f} | {v['output_tokens_per_s']:.1f} |")
    print(f"peak memory: pipeline {peaks['pipeline']:.0f} MB, vLLM server (all processes) {peaks['vllm']:.0f} MB; "
          f"equal answers {equal}/{args.n}")


if __name__ == "__main__":
    main()
