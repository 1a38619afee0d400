"""Decode speed of `torch.compile(model.forward, fullgraph=True)` with a static cache vs the same model in eager.

One model; each round runs greedy `generate(..., cache_implementation="static")` once with the eager forward and
once with the compiled one (interleaved, so load hits both alike). Round 0 is the warm-up and holds the compile
time; it is reported apart. The image is encoded outside `forward` (once per `generate`, in eager) in both cases.
"""

import statistics
import time

import torch

from bench_end_to_end import prompt_ids, timed_generate
from florence_vl import FlorenceVLForConditionalGeneration
from sizes import florence_vl_config
from timing import paired_ratio, summarize, synchronize


def run(florence2: str, llm: str, image_size: int, device: torch.device, dtype: torch.dtype, repeats: int,
        new_tokens: int, mode: str = "default", backend: str = "inductor", text_tokens: int = 32) -> dict:
    model = FlorenceVLForConditionalGeneration(florence_vl_config(florence2, llm, image_size)).to(device, dtype).eval()
    vocab = model.config.text_config.vocab_size
    text_ids = [3 + (17 * i) % (vocab - 8) for i in range(text_tokens)]
    inputs = {"input_ids": prompt_ids(model.config.num_image_tokens, model.config.image_token_id, text_ids, device),
              "pixel_values": torch.randn(1, 3, image_size, image_size, device=device, dtype=dtype)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    eager_forward = model.forward
    torch._dynamo.reset()
    compiled = torch.compile(eager_forward, fullgraph=True, backend=backend,
                             **({"mode": mode} if backend == "inductor" else {}))
    forwards = {"eager": eager_forward, "compiled": compiled}
    ttft, decode, outputs, compile_s = {name: [] for name in forwards}, {name: [] for name in forwards}, {}, None
    with torch.inference_mode():
        for round_index in range(repeats + 1):  # round 0 is the warm-up (and the compilation)
            for name, forward in forwards.items():
                model.forward = forward
                synchronize(device)
                start = time.perf_counter()
                first, rate = timed_generate(model, dict(inputs, cache_implementation="static"), new_tokens, device)
                if round_index == 0 and name == "compiled":
                    compile_s = time.perf_counter() - start
                if round_index:
                    ttft[name].append(first)
                    decode[name].append(rate)
            if round_index == 0:  # the greedy outputs must agree (checked once, outside the timed rounds)
                for name, forward in forwards.items():
                    model.forward = forward
                    outputs[name] = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                                   cache_implementation="static", pad_token_id=0).tolist()
    model.forward = eager_forward
    row = {"florence2_size": florence2, "llm": llm, "image_size": image_size, "new_tokens": new_tokens,
           "prompt_tokens": inputs["input_ids"].shape[1], "compile_mode": mode, "compile_backend": backend,
           "first_compiled_call_s": compile_s,
           "same_greedy_output": outputs["eager"] == outputs["compiled"],
           "ttft": {name: summarize(values) for name, values in ttft.items()},
           "decode_tokens_per_s": {name: {"median": statistics.median(values), "min": min(values), "max": max(values),
                                          "all": values} for name, values in decode.items()}}
    row["decode_speedup"] = row["decode_tokens_per_s"]["compiled"]["median"] / row["decode_tokens_per_s"]["eager"][
        "median"]
    row["paired"] = {"decode_speedup": paired_ratio(decode["compiled"], decode["eager"])}
    return row
