"""Multi-prompt vision (DaViT once + one BART-encoder pass per prompt) vs three stock Florence-2 calls.

The naive path is what the original Florence-VL code effectively ran: for each task prompt, a full
`Florence2ForConditionalGeneration` forward (DaViT, the BART encoder over [image ; prompt], one decoder step).
"""

import torch
from transformers import Florence2ForConditionalGeneration, LlamaConfig

from florence_vl import FlorenceVLForConditionalGeneration
from sizes import florence2_config, florence_vl_config
from timing import measure_interleaved, paired_ratio


def build_florence_vl(size: str, image_size: int, device: torch.device, dtype: torch.dtype,
                      batch_vision_prompts: bool = True) -> FlorenceVLForConditionalGeneration:
    """Florence-VL with a `size` vision part; the LLM is the toy one (only the vision path is timed here)."""
    config = florence_vl_config(size, "toy", image_size, batch_vision_prompts=batch_vision_prompts)
    return FlorenceVLForConditionalGeneration(config).to(device, dtype).eval()


def stock_florence2_inputs(model: Florence2ForConditionalGeneration, num_image_tokens: int,
                           prompt_ids: tuple[tuple[int, ...], ...], device: torch.device) -> list[torch.Tensor]:
    """One input row per prompt: `num_image_tokens` image placeholders followed by the prompt ids."""
    image_ids = [model.config.image_token_id] * num_image_tokens
    return [torch.tensor([image_ids + list(row)], device=device) for row in prompt_ids]


def run(sizes: list[str], image_size: int, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    results = []
    for size in sizes:
        ours = build_florence_vl(size, image_size, device, dtype)
        stock = Florence2ForConditionalGeneration(florence2_config(size)).to(device, dtype).eval()
        pixel_values = torch.randn(1, 3, image_size, image_size, device=device, dtype=dtype)
        config = ours.config
        stock_inputs = stock_florence2_inputs(stock, config.num_image_tokens, config.vision_prompt_ids, device)
        decoder_start = torch.tensor([[stock.config.text_config.decoder_start_token_id]], device=device)

        def multi_prompt(batched: bool):
            def call():
                ours.config.batch_vision_prompts = batched
                return ours.model.get_image_features(pixel_values)
            return call

        def naive_three_calls():
            return [stock(input_ids=ids, pixel_values=pixel_values, decoder_input_ids=decoder_start).logits
                    for ids in stock_inputs]

        with torch.inference_mode():
            timings = measure_interleaved(
                {"naive_3x_florence2": naive_three_calls, "ours_batched": multi_prompt(True),
                 "ours_per_prompt": multi_prompt(False)}, device, repeats)
        naive = timings["naive_3x_florence2"]["median_s"]
        runs = {name: timing["all_s"] for name, timing in timings.items()}
        results.append({
            "florence2_size": size, "image_size": image_size, "num_image_tokens": config.num_image_tokens,
            "num_prompts": len(config.vision_prompt_ids), "timings": timings,
            "speedup_batched_vs_naive": naive / timings["ours_batched"]["median_s"],
            "speedup_per_prompt_vs_naive": naive / timings["ours_per_prompt"]["median_s"],
            "batched_vs_per_prompt": timings["ours_per_prompt"]["median_s"] / timings["ours_batched"]["median_s"],
            "paired": {  # median over rounds of the per-round ratio (each round times all three back to back)
                "speedup_batched_vs_naive": paired_ratio(runs["naive_3x_florence2"], runs["ours_batched"]),
                "speedup_per_prompt_vs_naive": paired_ratio(runs["naive_3x_florence2"], runs["ours_per_prompt"]),
                "batched_vs_per_prompt": paired_ratio(runs["ours_per_prompt"], runs["ours_batched"])},
        })
        del ours, stock
    return results
