"""Batch invariance and memory under load: pipeline("image-text-to-text") on a saved tiny random checkpoint.

Requests of mixed image sizes and modes and prompt lengths give the same greedy answers in batches of 1, 4 and
16, and sequential requests do not grow the process's memory. The long version (64 requests, 500 sequential
requests with RSS at start and end) is `python benchmarks/fuzz_long.py --requests 64 --rss_requests 500`.
"""

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_config, tiny_processor
from transformers import pipeline

from florence_vl import FlorenceVLForConditionalGeneration

MAX_NEW_TOKENS = 4
MODES = ("RGB", "L", "RGBA", "P", "CMYK", "1", "I;16", "LA")
WORDS = ("what", "colour", "is", "the", "square", "on", "left", "describe", "this", "image", "über", "形状", "?")


def save_tiny_checkpoint(folder: Path) -> Path:
    config = tiny_config()
    torch.manual_seed(0)
    FlorenceVLForConditionalGeneration(config).save_pretrained(folder)
    tiny_processor(config).save_pretrained(folder)
    return folder


def request_image(rng: np.random.Generator) -> Image.Image:
    """Random pixels in a random mode, 1..200 px per side (the processor resizes to 64)."""
    width, height = (int(side) for side in rng.integers(1, 201, size=2))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mode = MODES[int(rng.integers(len(MODES)))]
    return image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)


def make_requests(count: int, seed: int = 0) -> list[list[dict]]:
    """`count` one-turn chats, each one image and a prompt of 1..40 words."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    requests = []
    for _ in range(count):
        prompt = " ".join(words.choice(WORDS) for _ in range(int(rng.integers(1, 41))))
        requests.append([{"role": "user", "content": [{"type": "image", "image": request_image(rng)},
                                                      {"type": "text", "text": prompt}]}])
    return requests


def answers(pipe, requests: list[list[dict]], batch_size: int) -> list[str]:
    outputs = pipe(text=requests, batch_size=batch_size, return_full_text=False,
                   generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False})
    return [output[0]["generated_text"] for output in outputs]


def rss_mb() -> float:
    """Resident set size of this process (VmRSS), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-florence-vl"))
    return pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)


def test_greedy_answers_do_not_depend_on_the_batch_size(pipe):
    requests = make_requests(16)
    one_by_one = answers(pipe, requests, batch_size=1)
    assert len(set(one_by_one)) >= 4, f"the requests must give different answers to catch a mix-up: {one_by_one}"
    for batch_size in (4, 16):
        assert answers(pipe, requests, batch_size) == one_by_one, f"batch_size={batch_size}"


def test_sequential_requests_do_not_grow_memory(pipe):
    requests = make_requests(10, seed=1)
    for request in requests:  # warm-up: allocator pools, lazy imports, caches reach their steady size
        answers(pipe, [request], batch_size=1)
    start = rss_mb()
    for index in range(50):
        answers(pipe, [requests[index % len(requests)]], batch_size=1)
    growth = rss_mb() - start
    assert growth < 64, f"RSS grew by {growth:.1f} MiB over 50 requests"
