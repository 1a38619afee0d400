"""Time to first token and decode speed: Florence-VL vs transformers' LLaVA-1.5 with the same LLM.

Both models get one image and the same prompt text and run greedy `generate` for `new_tokens` tokens.
A stopping criterion timestamps every generated token, so one call gives both numbers:
TTFT = first token time - call start (vision + projector + prefill + one sampling step);
decode tokens/s = (new_tokens - 1) / (last token time - first token time).
"""

import statistics
import time

import torch
from transformers import LlavaForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from florence_vl import FlorenceVLForConditionalGeneration
from sizes import florence_vl_config, llava_config, llava_num_image_tokens
from timing import paired_ratio, summarize, synchronize


class TokenClock(StoppingCriteria):
    """Never stops; records the wall time at which each new token was produced."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def prompt_ids(num_image_tokens: int, image_token_id: int, text_ids: list[int], device: torch.device) -> torch.Tensor:
    """`<s>` + the image placeholders + the prompt text, batch of one."""
    return torch.tensor([[1] + [image_token_id] * num_image_tokens + text_ids], device=device)


def timed_generate(model, inputs: dict, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """One greedy generate call; returns (TTFT seconds, decode tokens/s)."""
    clock = TokenClock(device)
    synchronize(device)
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)
    if output.shape[1] - inputs["input_ids"].shape[1] != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"generate produced {len(clock.times)} tokens, expected {new_tokens}.")
    decode_s = clock.times[-1] - clock.times[0]
    return clock.times[0] - start, (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan")


def build_models(florence2: str, clip: str, llm: str, image_size: int, device: torch.device, dtype: torch.dtype):
    """Florence-VL and LLaVA sharing one LLM config; the LLM weights are copied so both decode identically."""
    florence_vl = FlorenceVLForConditionalGeneration(florence_vl_config(florence2, llm, image_size))
    llava = LlavaForConditionalGeneration(llava_config(clip, llm))
    llava.model.language_model.load_state_dict(florence_vl.model.language_model.state_dict())
    llava.lm_head.load_state_dict(florence_vl.lm_head.state_dict())
    return florence_vl.to(device, dtype).eval(), llava.to(device, dtype).eval()


def run(florence2_sizes: list[str], clip: str, llm: str, image_size: int, device: torch.device,
        dtype: torch.dtype, repeats: int, new_tokens: int, text_tokens: int = 32) -> list[dict]:
    results = []
    for florence2 in florence2_sizes:
        florence_vl, llava = build_models(florence2, clip, llm, image_size, device, dtype)
        vocab = florence_vl.config.text_config.vocab_size
        text_ids = [3 + (17 * i) % (vocab - 8) for i in range(text_tokens)]  # plain tokens, never <image>
        clip_size = llava.config.vision_config.image_size
        inputs = {
            "florence_vl": {
                "input_ids": prompt_ids(florence_vl.config.num_image_tokens, florence_vl.config.image_token_id,
                                        text_ids, device),
                "pixel_values": torch.randn(1, 3, image_size, image_size, device=device, dtype=dtype)},
            "llava": {
                "input_ids": prompt_ids(llava_num_image_tokens(clip), llava.config.image_token_id, text_ids, device),
                "pixel_values": torch.randn(1, 3, clip_size, clip_size, device=device, dtype=dtype)},
        }
        for batch in inputs.values():
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        models = {"florence_vl": florence_vl, "llava": llava}
        ttft, decode = {name: [] for name in models}, {name: [] for name in models}
        with torch.inference_mode():
            for round_index in range(repeats + 1):  # round 0 is the warm-up
                for name, model in models.items():  # interleaved, so load from other processes hits both
                    first, rate = timed_generate(model, inputs[name], new_tokens, device)
                    if round_index:
                        ttft[name].append(first)
                        decode[name].append(rate)
        row = {"florence2_size": florence2, "clip_tower": clip, "llm": llm, "image_size": image_size,
               "prompt_tokens": {name: batch["input_ids"].shape[1] for name, batch in inputs.items()},
               "new_tokens": new_tokens,
               "attn_implementation": {name: model.config.text_config._attn_implementation
                                       for name, model in models.items()},
               "ttft": {name: summarize(values) for name, values in ttft.items()},
               "decode_tokens_per_s": {name: {"median": statistics.median(values), "min": min(values),
                                              "max": max(values)} for name, values in decode.items()}}
        row["ttft_ratio"] = row["ttft"]["florence_vl"]["median_s"] / row["ttft"]["llava"]["median_s"]
        row["decode_ratio"] = (row["decode_tokens_per_s"]["florence_vl"]["median"]
                               / row["decode_tokens_per_s"]["llava"]["median"])
        row["paired"] = {"ttft_ratio": paired_ratio(ttft["florence_vl"], ttft["llava"]),
                         "decode_ratio": paired_ratio(decode["florence_vl"], decode["llava"])}
        results.append(row)
        del florence_vl, llava, models
    return results
