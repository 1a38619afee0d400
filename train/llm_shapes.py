"""A tiny causal LM pretrained on the shapes-and-words text, so Florence-VL's stage 1 starts from an LLM that speaks.

The paper starts from instruction-tuned LLMs (Phi-3.5-mini, Llama-3.1-8B-Instruct). The miniature of that: a small
Llama (the LLM dims of `train/recipes/tiny_shapes_model.json`) trained with transformers' `Trainer` on the task's
text only, no images: conversations in the Phi-3 chat format Florence-VL's processor writes, where the user first
asks for the description and then asks questions whose answers follow from it (the word, its first letter, a
count, a colour, a side). So the LLM knows the vocabulary, the chat format, and how to read an answer out of a
description; what it cannot know without an image is the first description.
"""

import json
import random
import time
from pathlib import Path

import torch

from . import shapes
from .tiny_tokenizer import build_tokenizer, task_texts

MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
SYSTEM = "<|system|>\nYou are a helpful AI assistant.<|end|>"  # CHAT_TEMPLATES["phi3"]'s default system turn


def texts() -> list[str]:
    """Every text the study's tasks produce (the tokenizer is trained on these)."""
    rng = random.Random(7)
    extra = []
    for _ in range(3000):
        scene = shapes.sample_scene(rng)
        for qtype in shapes.STUDY_QUESTION_TYPES:
            if shapes.can_ask(scene, qtype):
                extra += list(shapes.ask(scene, qtype, rng))
    return task_texts() + sorted(set(extra))


def tokenizer():
    return build_tokenizer(texts(), vocab_size=460)


def conversation(scene: shapes.Scene, rng: random.Random, turns: int = 3) -> str:
    """Phi-3 chat text (as Florence-VL's processor renders it, without the image): the description, then questions."""
    questions = [q for q in shapes.ALL_QUESTION_TYPES if q != "describe" and shapes.can_ask(scene, q)]
    parts = [SYSTEM]
    for qtype in ["describe", *rng.sample(questions, turns)]:
        question, answer = shapes.ask(scene, qtype, rng)
        parts.append(f"\n<|user|>\n{question}<|end|>\n<|assistant|>\n{answer}<|end|>")
    return "".join(parts)


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [conversation(shapes.sample_scene(rng), rng) for _ in range(n)]


def train(out_dir: str | Path, steps: int = 1500, batch_size: int = 32, learning_rate: float = 1e-3,
          seed: int = 0, n_eval: int = 256) -> dict:
    """Pretrain with `Trainer` (causal-LM collator), save model + tokenizer to `out_dir`, return held-out losses."""
    from datasets import Dataset
    from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    out_dir = Path(out_dir)
    start = time.time()
    tok = tokenizer()
    tok.padding_side = "right"  # training; saved as left for generation below
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **MODEL)
    model = LlamaForCausalLM(config)

    def encode(n, data_seed):
        return Dataset.from_dict({"text": make_texts(n, data_seed)}).map(
            lambda batch: tok(batch["text"]), batched=True, remove_columns=["text"])

    args = TrainingArguments(output_dir=str(out_dir / "trainer"), max_steps=steps,
                             per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size, learning_rate=learning_rate,
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps * 3 // 100), weight_decay=0.0,
                             logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", use_cpu=True,
                             seed=seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=encode(steps * batch_size, seed + 1),
                      eval_dataset=encode(n_eval, 12345),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    tok.padding_side = "left"
    model.generation_config.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    metrics = {"eval_loss": round(eval_loss, 4), "follow_up_accuracy": follow_up_accuracy(model, tok),
               "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
               "train_seconds": round(time.time() - start, 1),
               "loss": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


@torch.inference_mode()
def follow_up_accuracy(model, tok, n: int = 64, seed: int = 54321) -> float:
    """Given the true description in the context, how often the greedy answer to a follow-up question that the
    description settles (word, first letter, count, colour, a side's shape) is right: does the LLM read?"""
    rng = random.Random(seed)
    readable = ("word", "first_letter", "count", "color", "left_shape", "right_shape")
    hits = 0
    model.eval()
    for _ in range(n):
        scene = shapes.sample_scene(rng)
        qtype = rng.choice([q for q in readable if shapes.can_ask(scene, q)])
        question, answer = shapes.ask(scene, qtype, rng)
        prompt = (f"{SYSTEM}\n<|user|>\n{shapes.DESCRIBE}<|end|>\n<|assistant|>\n{shapes.caption(scene)}<|end|>"
                  f"\n<|user|>\n{question}<|end|>\n<|assistant|>\n")
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        hits += shapes.is_correct(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), answer)
    return hits / n
