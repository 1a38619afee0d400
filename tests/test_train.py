"""Two-stage training through the real train/sft.py + TRL SFTTrainer on a tiny model (CPU, a few steps)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tiny import tiny_config, tiny_tokenizer

from florence_vl.train import sft

REPO = Path(__file__).resolve().parents[1]
SFT = str(REPO / "train" / "sft.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model config + tokenizer folder + LLaVA-style data (one corrupt and one missing image)."""
    root = tmp_path_factory.mktemp("train")
    (root / "model.json").write_text(json.dumps(tiny_config().to_dict()))
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    (root / "images").mkdir()
    records = []
    for index in range(16):
        Image.new("RGB", (48, 40), (index * 15, 255 - index * 15, 90)).save(root / "images" / f"{index}.png")
        records.append({"id": index, "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the colour?"}, {"from": "gpt", "value": f"colour {index}"}]})
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for name in ("corrupt.png", "missing.png"):
        records.append({"id": name, "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "nothing"}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def args_for(workdir, out, stage, *extra):
    return [
        "--stage", stage, "--model_config", str(workdir / "model.json"), "--tokenizer", str(workdir / "tokenizer"),
        "--llava_json", str(workdir / "data.json"), "--image_folder", str(workdir / "images"),
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--assistant_only_loss", "true", "--activation_checkpointing", "false", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", "--use_cpu", "true", "--bf16", "false", "--seed", "0",
        "--max_steps", "3",
        *extra,
    ]


def run_in_process(argv):
    script_args, training_args, model_args, project_args = sft.make_parser().parse_args_and_config(args=argv)
    return sft.main(script_args, training_args, model_args, project_args)


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed(before, model):
    return {name for name, parameter in model.named_parameters() if not torch.equal(before[name], parameter)}


GROUPS = {
    "davit": "model.vision_tower.davit.",
    "florence2 projection": "model.vision_tower.davit_projector.",
    "bart encoder": "model.vision_tower.prompt_encoder.",
    "dbfusion projector": "model.multi_modal_projector.",
    "llm": "model.language_model.",
}


def build_trainer(argv):
    return sft.build_trainer(*sft.make_parser().parse_args_and_config(args=argv))


def initial_weights(workdir, tmp_path, stage, *extra):
    """Weights of the randomly initialised model the script builds (same seed => same init)."""
    trainer = build_trainer(args_for(workdir, tmp_path / "init", stage, *extra))
    return {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}


def test_pretrain_trains_every_part_including_vision(workdir, tmp_path):
    trainer = run_in_process(args_for(workdir, tmp_path / "out", "pretrain"))
    before = initial_weights(workdir, tmp_path, "pretrain")
    after = dict(trainer.model.named_parameters())
    assert before.keys() == after.keys()
    for group, prefix in GROUPS.items():
        names = [name for name in after if name.startswith(prefix)]
        moved = [name for name in names if not torch.equal(before[name], after[name])]
        assert names and moved, f"{group}: no parameter changed"
    davit = [n for n in after if n.startswith(GROUPS["davit"]) and n.endswith("weight")]
    assert all(not torch.equal(before[n], after[n]) for n in davit), "every DaViT weight must train in stage 1"


def test_finetune_freezes_vision_and_trains_projector_and_llm(workdir, tmp_path):
    trainer = run_in_process(args_for(workdir, tmp_path / "out", "finetune"))
    before = initial_weights(workdir, tmp_path, "finetune")
    after = dict(trainer.model.named_parameters())
    for name, parameter in after.items():
        if name.startswith("model.vision_tower."):
            assert torch.equal(before[name], parameter), f"frozen vision parameter {name} changed"
            assert not parameter.requires_grad
    for group in ("dbfusion projector", "llm"):
        assert any(not torch.equal(before[n], after[n]) for n in after if n.startswith(GROUPS[group])), group


def test_finetune_vision_builds_no_autograd_graph(workdir, tmp_path):
    trainer = run_in_process(args_for(workdir, tmp_path / "out", "finetune", "--max_steps", "1"))
    model = trainer.model
    features = model.model.vision_tower(torch.randn(2, 3, 64, 64)).source_features
    assert all(feature.grad_fn is None and not feature.requires_grad for feature in features)


def test_lora_trains_only_adapters_and_projector_never_vision(workdir, tmp_path):
    trainer = run_in_process(args_for(workdir, tmp_path / "out", "finetune", "--use_peft", "true", "--lora_r", "4"))
    model = trainer.model
    lora_names = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora_names and all("language_model" in name for name in lora_names), "LoRA must land on the LLM only"
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert all("lora_" in name or "multi_modal_projector" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    base = initial_weights(workdir, tmp_path, "finetune")
    for name, parameter in model.named_parameters():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key in base and "multi_modal_projector" not in name:
            assert torch.equal(base[key], parameter), f"base weight {name} changed under LoRA"


def test_labels_cover_only_assistant_tokens(workdir, tmp_path):
    trainer = build_trainer(args_for(workdir, tmp_path / "out", "finetune"))
    examples = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(examples)
    tokenizer = trainer.processing_class.tokenizer
    image_token_id = trainer.processing_class.image_token_id
    for labels, answer in zip(batch["labels"], ["colour 0", "colour 1"]):
        kept = labels[labels != -100]
        assert image_token_id not in kept.tolist()
        assert tokenizer.decode(kept) == answer + "<|end|>"


def test_corrupt_and_missing_images_are_reported_and_skipped(workdir, tmp_path, capsys):
    trainer = run_in_process(args_for(workdir, tmp_path / "out", "finetune", "--max_steps", "1"))
    out = capsys.readouterr().out
    assert "skipped 2 samples" in out and "corrupt.png" in out and "missing.png" in out
    assert len(trainer.train_dataset) == 16


def test_saved_checkpoint_loads_in_fresh_process(workdir, tmp_path):
    out = tmp_path / "out"
    run_in_process(args_for(workdir, out, "finetune", "--max_steps", "2", "--save_strategy", "steps",
                            "--save_steps", "1"))
    for folder in (out, out / "checkpoint-1"):
        assert {"modeling_florence_vl.py", "configuration_florence_vl.py", "processing_florence_vl.py",
                "model.safetensors", "processor_config.json"} <= set(os.listdir(folder))
    code = ("import sys; from transformers import AutoModelForImageTextToText, AutoProcessor;"
            f"m = AutoModelForImageTextToText.from_pretrained({str(out / 'checkpoint-1')!r}, trust_remote_code=True);"
            f"p = AutoProcessor.from_pretrained({str(out / 'checkpoint-1')!r}, trust_remote_code=True);"
            "assert 'florence_vl' not in sys.modules; print(type(m).__module__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("transformers_modules")


def test_kill_and_resume_gives_the_same_weights(workdir, tmp_path):
    common = ["--max_steps", "24", "--save_strategy", "steps", "--save_steps", "4", "--dataloader_num_workers", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run([sys.executable, SFT, *args_for(workdir, full, "pretrain", *common)], env=env, check=True,
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, SFT, *args_for(workdir, killed, "pretrain", *common)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint-8" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run([sys.executable, SFT, *args_for(workdir, killed, "pretrain", *common),
                    "--resume_from_checkpoint", str(killed / "checkpoint-8")], env=env, check=True,
                   capture_output=True, timeout=300)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_model_from_config_starts_from_the_weights_the_class_builds(workdir, tmp_path):
    """`--model_config` builds through `_from_config` (what DeepSpeed ZeRO-3 needs); outside DeepSpeed the initial
    weights are those of calling the class with the same seed (the shipped recipe's starting point is unchanged)."""
    from transformers import set_seed

    from florence_vl import FlorenceVLForConditionalGeneration

    _, training_args, model_args, args = sft.make_parser().parse_args_and_config(
        args=args_for(workdir, tmp_path / "out", "pretrain"))
    set_seed(0)
    model, _ = sft.build_model_and_processor(args, model_args, training_args)
    set_seed(0)
    reference = FlorenceVLForConditionalGeneration(model.config)
    built, expected = model.state_dict(), reference.state_dict()
    assert built.keys() == expected.keys()
    assert all(built[k].dtype == expected[k].dtype and torch.equal(built[k], expected[k]) for k in expected)


def test_vision_param_groups_keep_the_chosen_optimizer_and_the_trainers_weight_decay(workdir, tmp_path):
    """`--vision_learning_rate` / `--vision_freeze_steps` put the vision parameters in groups of their own (marked
    `vision`, at their own lr) of the `--optim` optimizer, with the Trainer's weight-decay split."""
    trainer = build_trainer(args_for(workdir, tmp_path / "out", "pretrain", "--optim", "sgd", "--weight_decay", "0.1",
                                     "--vision_learning_rate", "1e-4", "--vision_freeze_steps", "1"))
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    grouped = []
    for group in optimizer.param_groups:
        group_names = [names[id(parameter)] for parameter in group["params"]]
        grouped += group_names
        assert {name.startswith(sft.VISION_TOWER_PREFIX) for name in group_names} == {group["vision"]}
        assert group["lr"] == (1e-4 if group["vision"] else 1e-3)
        assert {name in decay for name in group_names} == {group["weight_decay"] == 0.1}
    assert sorted(grouped) == sorted(names.values())
    assert {group["vision"] for group in optimizer.param_groups} == {True, False}


def test_vision_warmup_with_the_vision_part_frozen_throughout_is_refused(workdir, tmp_path):
    with pytest.raises(ValueError, match="--vision_freeze_steps 2: nothing of the vision part is trained"):
        build_trainer(args_for(workdir, tmp_path / "out", "pretrain", "--use_peft", "true", "--lora_r", "4",
                               "--vision_freeze_steps", "2"))


PAPER = {  # (stage, LLM) -> (global batch, learning rate), paper §9
    "phi35_pretrain": (4096, 1e-4), "phi35_finetune": (2048, 9e-5),
    "llama31_pretrain": (256, 2e-5), "llama31_finetune": (256, 1e-5),
}


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_recipes_parse_and_match_the_paper(recipe):
    path = REPO / "train" / "recipes" / f"{recipe}.yaml"
    values = yaml.safe_load(path.read_text())
    num_processes = yaml.safe_load((REPO / "train/accelerate/ddp.yaml").read_text())["num_processes"]
    script_args, training_args, model_args, project_args = sft.make_parser().parse_args_and_config(
        args=["--config", str(path), "--use_cpu", "true"])
    global_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                    * num_processes)
    assert (global_batch, training_args.learning_rate) == PAPER[recipe]
    assert training_args.lr_scheduler_type == "cosine" and training_args.warmup_steps == 0.03
    assert training_args.bf16 and training_args.activation_checkpointing and values["max_length"] == 2048
    assert project_args.stage == recipe.split("_")[1]


def test_tiny_shapes_recipe_shortened_runs_both_stages(tmp_path):
    """The shipped checkpoint's recipe (`train/tiny_shapes.sh`: stage 1, then stage 2 as questions only and then the
    full mix), a few steps of each part: trains, saves, and loads for generation."""
    recipes = REPO / "train" / "recipes"
    stage1, questions, stage2 = tmp_path / "stage1", tmp_path / "questions", tmp_path / "stage2"
    common = ["--max_steps", "3", "--shapes_train_size", "48", "--image_sensitivity_steps", "2",
              "--logging_steps", "1", "--vision_freeze_steps", "1"]
    run_in_process(["--config", str(recipes / "tiny_shapes_pretrain.yaml"), "--output_dir", str(stage1),
                    "--model_config", str(recipes / "tiny_shapes_model.json"), *common])
    first = run_in_process(["--config", str(recipes / "tiny_shapes_questions.yaml"), "--output_dir", str(questions),
                            "--model_name_or_path", str(stage1), *common])
    assert "describe" not in set(first.train_dataset["question_type"])  # the first part: questions only
    trainer = run_in_process(["--config", str(recipes / "tiny_shapes_finetune.yaml"), "--output_dir", str(stage2),
                              "--model_name_or_path", str(questions), *common])
    parts = [yaml.safe_load((recipes / f"tiny_shapes_{name}.yaml").read_text())
             for name in ("pretrain", "questions", "finetune")]  # the YAMLs chain each part's output to the next
    assert [part["model_name_or_path"] for part in parts[1:]] == [part["output_dir"] for part in parts[:-1]]
    assert parts[-1]["output_dir"] == "checkpoints/florence-vl-tiny-shapes"
    assert any("image_sensitivity" in entry for entry in trainer.state.log_history)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(stage2, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(stage2, trust_remote_code=True)
    eos = model.generation_config.eos_token_id  # the shapes tokenizer's eos is its end-of-turn token: listed once
    assert eos == [processor.tokenizer.convert_tokens_to_ids("<|end|>")], eos
    inputs = processor(text="<image>What word is written in the image?",
                       images=Image.new("RGB", (128, 128), "white"), return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_training_completes_over_every_kind_of_data_fault(workdir, tmp_path, capsys):
    """Unreadable files are skipped and reported; modes other than RGB are converted; an over-long conversation is
    truncated after its image; a conversation without `<image>` gets its image before the first turn."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(images / "good.jpg")
    truncated = (images / "good.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (images / "empty.png").write_bytes(b"")
    Image.new("L", (40, 48), 90).save(images / "gray.png")
    Image.new("CMYK", (48, 48), (0, 200, 200, 20)).save(images / "cmyk.jpg")
    turn = lambda question, answer: [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]  # noqa: E731
    records = [{"id": i, "image": name, "conversations": turn("<image>\nWhat colour?", "red")}
               for i, name in enumerate(["good.jpg", "truncated.jpg", "empty.png", "missing.png", "gray.png",
                                         "cmyk.jpg"] * 2)]
    records.append({"id": "long", "image": "good.jpg", "conversations": turn("<image>\nTalk.", "red " * 500)})
    records.append({"id": "no-marker", "image": "gray.png", "conversations": turn("What colour?", "gray")})
    (tmp_path / "faults.json").write_text(json.dumps(records))
    argv = args_for(workdir, tmp_path / "out", "pretrain", "--max_steps", "3", "--max_length", "64")
    argv[argv.index("--llava_json") + 1] = str(tmp_path / "faults.json")
    argv[argv.index("--image_folder") + 1] = str(images)
    trainer = run_in_process(argv)
    out = capsys.readouterr().out
    assert "skipped 6 samples" in out and all(name in out for name in ("truncated.jpg", "empty.png", "missing.png"))
    assert len(trainer.train_dataset) == 8 and trainer.state.global_step == 3
    modes = sorted(example["images"][0].mode for example in trainer.train_dataset)
    assert modes == ["CMYK", "CMYK", "L", "L", "L", "RGB", "RGB", "RGB"]  # kept as they are; the processor converts
    no_marker = next(e for e in trainer.train_dataset if e["messages"][1]["content"][0]["text"] == "gray")
    assert no_marker["messages"][0]["content"][0]["type"] == "image"


# ---------------------------------------------------------------------------------- loading: dtype and attention


@pytest.fixture(scope="module")
def bf16_parts(tmp_path_factory):
    """A native Florence-2 folder and a bfloat16 Llama folder, as `--florence2 --llm` take them."""
    from test_convert import florence2_tokenizer, llm_tokenizer_without_image_token
    from tiny import TEXT_CONFIGS, tiny_florence2_config
    from transformers import AutoConfig, AutoModelForCausalLM, Florence2ForConditionalGeneration

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(tiny_florence2_config()).save_pretrained(root / "florence2")
    florence2_tokenizer().save_pretrained(root / "florence2")
    tokenizer = llm_tokenizer_without_image_token()
    text_config = AutoConfig.for_model(**dict(TEXT_CONFIGS["llama"], vocab_size=len(tokenizer)))
    AutoModelForCausalLM.from_config(text_config).to(torch.bfloat16).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root


def attention_of(model) -> dict[str, str]:
    tower = model.model.vision_tower
    return {"davit": tower.davit.config._attn_implementation, "bart": tower.prompt_encoder.config._attn_implementation,
            "llm": model.model.language_model.config._attn_implementation}


@pytest.mark.parametrize("dtype, attention, expected", [
    ("float32", "eager", {"davit": "eager", "bart": "eager", "llm": "eager"}),
    ("bfloat16", "sdpa", {"davit": "sdpa", "bart": "sdpa", "llm": "sdpa"}),
    ("float32", '{"text_config": "eager", "vision_config": "sdpa"}', {"davit": "sdpa", "bart": "sdpa", "llm": "eager"}),
], ids=["float32-eager", "bfloat16-sdpa", "per-sub-config"])
def test_every_model_source_honours_dtype_and_attention(bf16_parts, workdir, tmp_path, dtype, attention, expected):
    """Stage 1 from parts (a bf16 LLM), a saved Florence-VL folder, and a config: the dtype and attention asked for.

    Before: `--florence2 --llm` dropped both, so float32 + eager gave bf16 parameters (AdamW on bf16 weights) and SDPA.
    """
    attention_arg = json.loads(attention) if attention.startswith("{") else attention
    common = ["--dtype", dtype, "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true"]
    sources = {
        "parts": ["--florence2", str(bf16_parts / "florence2"), "--llm", str(bf16_parts / "llm")],
        "config": ["--model_config", str(workdir / "model.json"), "--tokenizer", str(workdir / "tokenizer")],
        "folder": ["--model_name_or_path", str(tmp_path / "folder")],  # what "parts" saves
    }
    for name, source in sources.items():
        _, training_args, model_args, args = sft.make_parser().parse_args_and_config(args=[*source, *common])
        model_args.attn_implementation = attention_arg  # a dict comes from YAML; the CLI takes strings
        model, processor = sft.build_model_and_processor(args, model_args, training_args)
        assert {parameter.dtype for parameter in model.parameters()} == {getattr(torch, dtype)}, name
        assert attention_of(model) == expected, name
        if name == "parts":
            model.save_pretrained(tmp_path / "folder")
            processor.save_pretrained(tmp_path / "folder")


def test_stage_two_switches_a_loaded_processor_to_the_original_stage_two_format():
    """Stage 1 of the original is `plain` + stretched images, stage 2 `phi3`/`llama3` + pad: the stage-2 recipes
    set both on the processor loaded from the stage-1 folder; without the flags it is kept as saved."""
    from tiny import tiny_processor

    from florence_vl import CHAT_TEMPLATES

    processor = tiny_processor(family="plain")
    processor.image_aspect_ratio = "resize"
    kept = sft.set_prompt_and_image_format(processor, sft.FlorenceVLArguments(), "phi3")
    assert kept.chat_template == CHAT_TEMPLATES["plain"] and kept.image_aspect_ratio == "resize"
    switched = sft.set_prompt_and_image_format(
        processor, sft.FlorenceVLArguments(chat_template="phi3", image_aspect_ratio="pad"), "phi3")
    assert switched.chat_template == CHAT_TEMPLATES["phi3"] and switched.image_aspect_ratio == "pad"
    with pytest.raises(ValueError, match="'square'"):
        sft.set_prompt_and_image_format(processor, sft.FlorenceVLArguments(image_aspect_ratio="square"), "phi3")
    for name in ("phi35", "llama31"):
        stage_one = yaml.safe_load((REPO / f"train/recipes/{name}_pretrain.yaml").read_text())
        stage_two = yaml.safe_load((REPO / f"train/recipes/{name}_finetune.yaml").read_text())
        assert (stage_one["chat_template"], stage_one["image_aspect_ratio"]) == ("plain", "resize")
        assert stage_two["chat_template"] in ("phi3", "llama3") and stage_two["image_aspect_ratio"] == "pad"
