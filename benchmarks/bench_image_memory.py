"""Peak memory of a 13000x13000 grayscale PNG (164 KB on disk, 161 MiB decoded) through the processor and vLLM's server.

Processor (main environment), before vs after bounded preprocessing, side by side in one run:

    .venv/bin/python benchmarks/bench_image_memory.py processor --out benchmarks/results.image_memory.json

"before" is `processing_florence_vl.py` as it was before (commit BEFORE, read with `git show`), "after" this checkout's,
both with Florence-2's 768-px image processor and the shipped checkpoint's tokenizer; "after" runs with the limit
lifted (`max_image_pixels=None`, so the image is processed) and with the default (refused). Each measurement is a
fresh process, variants interleaved round by round: warm up on a small image, reset the peak resident set
(`/proc/self/clear_refs`), then process the PNG by path; "peak above baseline" = VmHWM - VmRSS before the call (the
decoded image itself, 161 MiB, included; "before" peaks at about 2.7 GB). Pixel values are compared by hash.

Speed on ordinary photos (main environment), before vs after, same processors, interleaved in one process (RGB noise
at 640x480, 1024x768 and 4032x3024, "pad", 768 px):

    .venv/bin/python benchmarks/bench_image_memory.py speed --out benchmarks/results.image_memory.json

vLLM server (vLLM environment; README's serving flags, the PNG sent as a data URL, as a remote client would):

    .venv-vllm/bin/python benchmarks/bench_image_memory.py server --out benchmarks/results.image_memory.json

once with the checkpoint's defaults and once with `--mm-processor-kwargs '{"max_image_pixels": null}'`; for the API
process and the engine process: resident set before, peak during the request (after a `clear_refs` reset), resident
set after, then whether a normal request is still answered. Results of both parts go into one JSON file (each
part replaces its own key).
"""

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "florence-vl-tiny-shapes"
BEFORE = "3f0cf48"  # the last commit with full-size preprocessing and no max_image_pixels
SIDE = 13000
MB = 2**20

WORKER = r"""
import hashlib, importlib.util, json, sys, time
from PIL import Image
from transformers import PreTrainedTokenizerFast

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

module_path, png, limit = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
spec = importlib.util.spec_from_file_location("processing_variant", module_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kwargs = {} if limit == "default" else {"max_image_pixels": limit}
processor = module.FlorenceVLProcessor(image_processor=module.florence2_image_processor(768),
                                       tokenizer=PreTrainedTokenizerFast.from_pretrained(sys.argv[4]), **kwargs)
processor(text="<image>", images=Image.new("L", (300, 200)), return_tensors="pt")  # warm up
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # VmHWM := VmRSS
baseline = status("VmRSS")
start = time.perf_counter()
try:
    values = processor(text="<image>", images=png, return_tensors="pt")["pixel_values"]
    outcome = hashlib.sha256(values.numpy().tobytes()).hexdigest()[:16]
except ValueError as error:
    outcome = "ValueError: " + str(error)[:160]
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "baseline_mb": baseline / 2**20,
                  "peak_above_baseline_mb": (status("VmHWM") - baseline) / 2**20, "outcome": outcome}))
"""


def write_png(folder: Path) -> Path:
    from PIL import Image

    path = folder / f"gray_{SIDE}.png"
    Image.new("L", (SIDE, SIDE), 0).save(path)
    return path


def processor_part(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-image-memory-"))
    png = write_png(folder)
    before = Path(load_before(folder).__file__)
    variants = {"before": (before, "default"), "after (limit lifted)": (ROOT / "processing_florence_vl.py", None),
                "after (default limit)": (ROOT / "processing_florence_vl.py", "default")}
    runs = {name: [] for name in variants}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for round_index in range(args.rounds):
        for name, (module, limit) in variants.items():
            result = subprocess.run([sys.executable, "-c", WORKER, str(module), str(png), json.dumps(limit),
                                     str(CHECKPOINT)], capture_output=True, text=True, env=env, timeout=1800)
            if result.returncode != 0:
                raise RuntimeError(f"{name}: {result.stderr[-3000:]}")
            line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
            runs[name].append(json.loads(line.removeprefix("RESULT ")))
            print(f"round {round_index} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    summary = {name: {"peak_above_baseline_mb": max(run["peak_above_baseline_mb"] for run in results),
                      "seconds": [round(run["seconds"], 2) for run in results], "outcome": results[-1]["outcome"]}
               for name, results in runs.items()}
    summary["peak_ratio_before_over_after"] = (summary["before"]["peak_above_baseline_mb"]
                                               / summary["after (limit lifted)"]["peak_above_baseline_mb"])
    summary["pixel_values_equal"] = summary["before"]["outcome"] == summary["after (limit lifted)"]["outcome"]
    return {"png": {"side": SIDE, "bytes": png.stat().st_size, "decoded_mb": SIDE * SIDE / MB},
            "before_commit": BEFORE, "rounds": args.rounds, "summary": summary, "runs": runs}


def load_before(folder: Path):
    import importlib.util

    path = folder / "processing_before.py"
    path.write_text(subprocess.run(["git", "show", f"{BEFORE}:processing_florence_vl.py"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("processing_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def speed_part(args) -> dict:
    import statistics

    import numpy as np
    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    import florence_vl.processing_florence_vl as after

    before = load_before(Path(tempfile.mkdtemp(prefix="bench-image-speed-")))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(CHECKPOINT)
    processors = {name: module.FlorenceVLProcessor(image_processor=module.florence2_image_processor(768),
                                                   tokenizer=tokenizer) for name, module in
                  (("before", before), ("after", after))}
    rows = []
    for width, height in ((640, 480), (1024, 768), (4032, 3024)):
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        times = {name: [] for name in processors}
        for _ in range(args.repeats):
            for name, processor in processors.items():
                start = time.perf_counter()
                processor(text="<image>", images=image, return_tensors="pt")
                times[name].append(time.perf_counter() - start)
        row = {"size": [width, height], **{f"{name}_median_s": statistics.median(t) for name, t in times.items()},
               "ratio_before_over_after": statistics.median(times["before"]) / statistics.median(times["after"]),
               "median_per_round_ratio": statistics.median(b / a for b, a in zip(times["before"], times["after"]))}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return {"repeats": args.repeats, "summary": rows}


# --------------------------------------------------------------------------------------------------- vLLM server

def status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve(extra: list[str], log: Path):
    """README's flags (loopback, float32, small KV cache), one server; returns (process, client)."""
    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(CHECKPOINT),
               "--served-model-name", "florence-vl", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(512 * MB), "--max-num-seqs", "64",
               "--seed", "0", *extra]
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=900)
    deadline = time.monotonic() + 900
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            client.models.list()
            return process, client
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def data_url(image_or_path) -> str:
    from PIL import Image

    if isinstance(image_or_path, Image.Image):
        buffer = io.BytesIO()
        image_or_path.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        data = Path(image_or_path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(client, url: str) -> tuple[int, str]:
    import openai

    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]
    try:
        response = client.chat.completions.create(model="florence-vl", temperature=0.0, max_tokens=8,
                                                  messages=[{"role": "user", "content": content}])
        return 200, response.choices[0].message.content
    except openai.APIStatusError as error:
        return error.status_code, error.message[:300]


def server_part(args) -> dict:
    import psutil
    import vllm
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bench-image-memory-"))
    big = data_url(write_png(folder))
    small = data_url(Image.new("RGB", (128, 128), (40, 80, 220)))
    results = {"vllm": vllm.__version__}
    for name, extra in {"default limit": [],
                        "limit lifted": ["--mm-processor-kwargs", json.dumps({"max_image_pixels": None})]}.items():
        process, client = serve(extra, folder / f"server-{name.replace(' ', '-')}.log")
        try:
            ask(client, small)  # warm up: first multimodal request
            pids = {"api": process.pid}
            children = psutil.Process(process.pid).children(recursive=True)
            pids["engine"] = max(children, key=lambda child: child.memory_info().rss).pid
            row = {role: {"before_mb": status_mb(pid, "VmRSS")} for role, pid in pids.items()}
            for pid in pids.values():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            start = time.perf_counter()
            status, text = ask(client, big)
            row["request"] = {"status": status, "answer_or_error": text, "seconds": time.perf_counter() - start}
            for role, pid in pids.items():
                row[role].update(peak_mb=status_mb(pid, "VmHWM"), after_mb=status_mb(pid, "VmRSS"))
                row[role]["peak_above_before_mb"] = row[role]["peak_mb"] - row[role]["before_mb"]
            row["next_request"] = ask(client, small)
            for role, pid in pids.items():
                row[role]["after_next_request_mb"] = status_mb(pid, "VmRSS")
            results[name] = row
            print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=120)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["processor", "speed", "server"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="speed: timed calls per size and version")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.image_memory.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"processor": processor_part, "speed": speed_part, "server": server_part}[args.part](args)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report[args.part] = {"load_avg": os.getloadavg(), "cpus": os.cpu_count(), **result}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report[args.part].get("summary", result), indent=1))


if __name__ == "__main__":
    main()
