"""Held-out shapes-and-words prompts for the vLLM parity test, and the transformers pipeline's answers to them.

Seed 777 is never used in training (the recipe trains on seeds 0-2; README's held-out evaluation uses 12345).
`python tests_vllm/shapes_reference.py` (main environment, transformers >= 5.24) rewrites
`shapes_reference.json` with the greedy answers of `pipeline("image-text-to-text")`; the vLLM tests read it.
"""

import json
import sys
from pathlib import Path

from florence_vl.train.shapes import make_examples

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "florence-vl-tiny-shapes"
REFERENCE = Path(__file__).with_name("shapes_reference.json")
FEATURES = Path(__file__).with_name("image_features_reference.safetensors")
SEED, N, MAX_NEW_TOKENS, FEATURE_IMAGES = 777, 200, 48, 4


def examples() -> list[dict]:
    """[{"image": PIL image, "question": str, "answer": str, "question_type": str}] for the N held-out prompts."""
    return [{"image": example["images"][0], "question": example["messages"][0]["content"][1]["text"],
             "answer": example["answer"], "question_type": example["question_type"]}
            for example in make_examples(N, SEED, "heldout")]


def conversation(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def main(batch_size: int = 8) -> None:
    import torch
    from transformers import pipeline

    torch.manual_seed(0)
    pipe = pipeline("image-text-to-text", model=str(CHECKPOINT), trust_remote_code=True, dtype=torch.float32)
    items = examples()
    outputs = pipe(text=[conversation(item["image"], item["question"]) for item in items], batch_size=batch_size,
                   generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}, return_full_text=False)
    records = [{"question": item["question"], "answer": item["answer"], "question_type": item["question_type"],
                "pipeline": output[0]["generated_text"]} for item, output in zip(items, outputs)]
    import transformers
    REFERENCE.write_text(json.dumps({"seed": SEED, "n": N, "max_new_tokens": MAX_NEW_TOKENS,
                                     "transformers": transformers.__version__, "batch_size": batch_size,
                                     "records": records}, indent=1) + "\n")
    print(f"wrote {REFERENCE} ({len(records)} answers)", file=sys.stderr)
    write_image_features(pipe.model, pipe.processor, items[:FEATURE_IMAGES])


def write_image_features(model, processor, items: list[dict]) -> None:
    """The projected image features (`get_image_features(...).pooler_output`) of a few held-out images."""
    import torch
    from safetensors.torch import save_file

    pixel_values = processor.image_processor([item["image"] for item in items], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        features = model.get_image_features(pixel_values).pooler_output
    save_file({"features": features.contiguous()}, str(FEATURES))
    print(f"wrote {FEATURES} ({tuple(features.shape)})", file=sys.stderr)


if __name__ == "__main__":
    main()


def rank_summary(model, pixel_values) -> dict:
    """What one tensor-parallel rank holds and computes: the LLM's first attention layer (heads, fused q/k/v rows),
    the vocabulary rows of its LM head, and the projected image features of `pixel_values`.

    For `LLM.apply_model` (`test_tensor_parallel.py`): vLLM sends the function to its workers with plain pickle, so
    it lives in a module the workers can import (this folder is on their `sys.path`), not inside a test."""
    import torch

    attention = model.language_model.model.layers[0].self_attn
    with torch.inference_mode():
        features = model.embed_multimodal(pixel_values=pixel_values)
    # partition sizes, not weight shapes: on CPU vLLM may repack a linear layer's weight into another tensor
    return {"heads": attention.num_heads, "kv_heads": attention.num_kv_heads,
            "qkv_rows": attention.qkv_proj.output_size_per_partition,
            "vocab_rows": model.language_model.lm_head.num_embeddings_per_partition, "features": features.cpu()}


def load_reference() -> list[dict]:
    data = json.loads(REFERENCE.read_text())
    if (data["seed"], data["n"], data["max_new_tokens"]) != (SEED, N, MAX_NEW_TOKENS):
        raise ValueError(f"{REFERENCE} was made for another set; rerun `python {Path(__file__).name}`")
    return data["records"]
