"""Florence-VL training with TRL's SFTTrainer: stage 1 (`pretrain`, everything trained) and stage 2
(`finetune`, vision frozen; projector + LLM trained, optionally with LoRA via `--use_peft`).

```bash
# Stage 1 then stage 2 of a recipe (YAML files hold every argument; flags override them):
accelerate launch --config_file train/accelerate/ddp.yaml train/sft.py --config train/recipes/phi35_pretrain.yaml
accelerate launch --config_file train/accelerate/ddp.yaml train/sft.py --config train/recipes/phi35_finetune.yaml

# The tiny shapes-and-words checkpoint shipped in checkpoints/ (CPU, one core: ~12 + ~4 + ~1 min; train/tiny_shapes.sh):
python train/sft.py --config train/recipes/tiny_shapes_pretrain.yaml
python train/sft.py --config train/recipes/tiny_shapes_questions.yaml   # stage 2, part 1: short-answer questions
python train/sft.py --config train/recipes/tiny_shapes_finetune.yaml    # stage 2, part 2: the full instruction mix
```

Model sources, in order: `--model_name_or_path` (a Florence-VL folder or Hub id), `--florence2` + `--llm`
(pretrained parts), or `--model_config` (a JSON of `FlorenceVLConfig` arguments, random weights) + `--tokenizer`.
Data: `--dataset_name` (any `datasets` dataset in conversational format), `--llava_json` + `--image_folder`,
or `--shapes_train_size` (the synthetic shapes-and-words task).
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback, set_seed
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

from florence_vl import FlorenceVLConfig, FlorenceVLForConditionalGeneration, FlorenceVLProcessor
from florence_vl.processing_florence_vl import CHAT_TEMPLATES
from florence_vl.train import data as data_utils

logger = logging.getLogger(__name__)
# Our vision tower's parameters (DaViT, its projection, the BART prompt encoder); PEFT may prefix the names.
VISION_TOWER_PREFIX = "model.vision_tower."
# LoRA lands on the LLM's projections only: the Florence-2 BART encoder has q_proj/k_proj/v_proj/out_proj too.
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj)"


@dataclass
class FlorenceVLArguments:
    stage: str = field(default="finetune", metadata={"help": "pretrain (train everything) or finetune (vision frozen)."})
    model_config: str | None = field(default=None, metadata={"help": "JSON of FlorenceVLConfig args (random init)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder for --model_config, or "
                                                                   "'shapes' for the task's built-in tokenizer."})
    chat_template: str | None = field(default=None, metadata={
        "help": f"One of {sorted(CHAT_TEMPLATES)} or a Jinja template (the original: plain in stage 1, the LLM's "
                "family in stage 2). Default: a loaded model keeps its own; a new one gets its LLM's family (phi3 "
                "for --model_config)."})
    image_aspect_ratio: str | None = field(default=None, metadata={
        "help": "pad (centred on the mean colour) or resize (stretched); the original pads in stage 2 and "
                "stretches in stage 1. Default: a loaded model keeps its own; a new one pads."})
    florence2: str | None = field(default=None, metadata={"help": "Native Florence-2 checkpoint (with --llm)."})
    llm: str | None = field(default=None, metadata={"help": "Causal-LM checkpoint (with --florence2)."})
    llava_json: str | None = field(default=None, metadata={"help": "LLaVA-style JSON/JSONL training data."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the --llava_json image paths live in."})
    shapes_train_size: int = field(default=0, metadata={"help": "Train on N synthetic shapes-and-words examples."})
    shapes_seed: int = field(default=0, metadata={"help": "Seed of the synthetic training examples."})
    shapes_question_mix: float | None = field(default=None, metadata={"help": "Fraction of question examples."})
    shapes_question_types: list[str] | None = field(default=None, metadata={
        "help": "Question types of the synthetic task (default: its five; see shapes.ALL_QUESTION_TYPES)."})
    vision_freeze_steps: int = field(default=0, metadata={"help": "Pretrain: keep vision frozen for the first K "
                                                                    "steps (warm-up), then train it."})
    vision_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the vision part "
                                                                             "(default: --learning_rate)."})
    image_sensitivity_steps: int = field(default=0, metadata={"help": "Log image sensitivity every N steps (0: off)."})


def model_init_kwargs(model_args: ModelConfig, training_args: SFTConfig | None = None) -> dict:
    """How every model source is loaded, as TRL loads a model named by path: `--model_init_kwargs` (JSON) and
    `--trust_remote_code`, with `--dtype` (a torch dtype, or `auto` for the checkpoints' own), `--model_revision` and
    `--attn_implementation` (a string, or a dict per sub-config) on top."""
    kwargs = dict(getattr(training_args, "model_init_kwargs", None) or {})
    kwargs.setdefault("trust_remote_code", getattr(training_args, "trust_remote_code", False))
    kwargs["revision"] = model_args.model_revision
    dtype = model_args.dtype if model_args.dtype is not None else kwargs.get("dtype", "auto")
    kwargs["dtype"] = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def build_model_and_processor(args: FlorenceVLArguments, model_args: ModelConfig,
                              training_args: SFTConfig | None = None):
    load = model_init_kwargs(model_args, training_args)
    if model_args.model_name_or_path:  # this package's classes: no remote code needed for a Florence-VL folder
        load.update(quantization_kwargs(model_args))
        model = FlorenceVLForConditionalGeneration.from_pretrained(model_args.model_name_or_path, **load)
        keep_only_used_weight_conversions(model)
        # trust_remote_code given explicitly (default False: this package's own classes load the folder): left unset,
        # the processor's tokenizer lookup reads the folder's `auto_map` and asks "Do you wish to run the custom
        # code?" on stdin, which a non-interactive `accelerate launch` cannot answer.
        processor = FlorenceVLProcessor.from_pretrained(model_args.model_name_or_path, revision=load["revision"],
                                                        trust_remote_code=load["trust_remote_code"])
        return model, set_prompt_and_image_format(processor, args, model.config.text_config.model_type)
    if get_quantization_config(model_args) is not None:
        raise ValueError("--load_in_4bit/--load_in_8bit need --model_name_or_path (a saved Florence-VL model); got "
                         f"florence2={args.florence2!r}, llm={args.llm!r}, model_config={args.model_config!r}.")
    if args.florence2 and args.llm:
        from florence_vl.convert import from_pretrained_parts

        dtype = load.pop("dtype")
        model, processor = from_pretrained_parts(florence2=args.florence2, llm=args.llm,
                                                 chat_template=args.chat_template,
                                                 dtype=None if dtype == "auto" else dtype, model_init_kwargs=load)
        return model, set_prompt_and_image_format(processor, args, model.config.text_config.model_type)
    if not (args.model_config and args.tokenizer):
        raise ValueError("Give a model: --model_name_or_path, --florence2 with --llm, or --model_config with "
                         "--tokenizer.")
    if args.tokenizer == "shapes":
        from florence_vl.train.tiny_tokenizer import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with open(args.model_config) as file:
        options = json.load(file)
    options["image_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    options.setdefault("text_config", {}).update(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = FlorenceVLConfig(**options)
    # `_from_config`, as transformers' Auto classes build models: under DeepSpeed ZeRO-3 it builds the whole model
    # inside `zero.Init` and initialises the sharded weights by gathering them. Calling the class would shard only
    # the LLM (built with `AutoModel.from_config` inside), then initialise its empty shards and fail.
    model = FlorenceVLForConditionalGeneration._from_config(config)
    if "attn_implementation" in load:
        model.set_attn_implementation(load["attn_implementation"])
    if load["dtype"] != "auto":
        model.to(load["dtype"])
    from florence_vl.convert import build_processor, resolve_chat_template, set_generation_defaults

    set_generation_defaults(model, tokenizer)
    template = resolve_chat_template(args.chat_template or "phi3", config.text_config.model_type)
    return model, build_processor(tokenizer, config, template, args.image_aspect_ratio or "pad")


def keep_only_used_weight_conversions(model) -> None:
    """Forget the weight renamings that loading did not use, as transformers does outside DeepSpeed ZeRO-3.

    Under ZeRO-3, transformers 5.25 (`_load_state_dict_into_zero3_model`) remembers every renaming it knows, used or
    not, and `save_pretrained` reverts them all: the generic legacy rule (`model.language_model.model.*` ->
    `model.language_model.*`) then saves the LLM under `model.language_model.model.*`, which no other engine writes.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def set_prompt_and_image_format(processor, args: FlorenceVLArguments, text_model_type: str):
    """Apply --chat_template / --image_aspect_ratio when given (e.g. stage 2 after a `plain`, stretched stage 1)."""
    from florence_vl.convert import resolve_chat_template
    from florence_vl.processing_florence_vl import IMAGE_ASPECT_RATIOS

    if args.chat_template:
        processor.chat_template = resolve_chat_template(args.chat_template, text_model_type)
    if args.image_aspect_ratio:
        if args.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"--image_aspect_ratio {args.image_aspect_ratio!r} must be one of {IMAGE_ASPECT_RATIOS}.")
        processor.image_aspect_ratio = args.image_aspect_ratio
    return processor


def quantization_kwargs(model_args: ModelConfig) -> dict:
    """QLoRA loading (`--load_in_4bit` / `--load_in_8bit`): only the LLM is quantized (the model keeps its vision
    tower and projector out of it); each process loads onto its own GPU (what TRL's `get_kbit_device_map` did)."""
    quantization_config = get_quantization_config(model_args)
    if quantization_config is None:
        return {}
    device_map = {"": PartialState().local_process_index} if torch.cuda.is_available() else None
    return dict(quantization_config=quantization_config, device_map=device_map)


def is_quantized(model) -> bool:
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def load_train_dataset(args: FlorenceVLArguments, script_args: ScriptArguments):
    if args.shapes_train_size:
        from florence_vl.train.shapes import make_dataset

        return make_dataset(args.shapes_train_size, seed=args.shapes_seed, stage=args.stage,
                            question_mix=args.shapes_question_mix, question_types=args.shapes_question_types)
    if args.llava_json:
        from datasets import Dataset

        report = data_utils.SkipReport()
        examples = data_utils.load_llava_json(args.llava_json, args.image_folder or ".", report)
        print(f"Data: {len(examples)} examples from {args.llava_json}; {report.summary()}")
        return Dataset.from_list(examples)
    if script_args.dataset_name:
        return data_utils.load_any(script_args.dataset_name, split=script_args.dataset_train_split,
                                   streaming=script_args.dataset_streaming)
    raise ValueError("Either `dataset_name`, `llava_json` or `shapes_train_size` must be provided.")


def set_vision_trainable(model, trainable: bool) -> None:
    for name, parameter in model.named_parameters():
        if VISION_TOWER_PREFIX in name and "lora_" not in name:
            parameter.requires_grad_(trainable)


class VisionParamGroups:
    """Optimizer factory for `SFTTrainer(optimizer_cls_and_kwargs=...)`: the `--optim` optimizer with the Trainer's
    weight-decay split, and the vision parameters in param groups of their own (marked `"vision": True`), at
    `--vision_learning_rate` when given.

    Groups of their own let the warm-up hold the vision parameters out of the optimizer step (`VisionWarmupCallback`)
    under every engine: DeepSpeed ZeRO flattens each param group into one tensor, so that is the finest unit it steps.
    """

    def __call__(self, model, *, optimizer_cls, optimizer_kwargs: dict, vision_lr: float | None, weight_decay: float,
                 decay_parameter_names):
        decay_names = set(decay_parameter_names(model))
        groups = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((VISION_TOWER_PREFIX in name, name in decay_names), []).append(parameter)
        param_groups = []
        for (is_vision, decay), params in groups.items():
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0, "vision": is_vision}
            if is_vision and vision_lr is not None:
                group["lr"] = vision_lr
            param_groups.append(group)
        return optimizer_cls(param_groups, **optimizer_kwargs)


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper and DeepSpeed's ZeRO optimizer (each keeps it in `.optimizer`)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class VisionWarmupCallback(TrainerCallback):
    """Keep the vision part frozen for the first `steps` optimizer steps, then train it.

    A randomly initialised LLM otherwise learns to ignore the image before the vision features carry signal.
    Frozen means unchanged under every engine: the vision parameters stop requiring gradients (no backward through
    them), and their param groups (`VisionParamGroups`) are taken out of each optimizer step. The second part matters
    under DeepSpeed ZeRO, which keeps zero gradients for them in its flat buffers: AdamW would still decay them and
    count steps in their state. Held out, they have no optimizer state until the warm-up ends, as under DDP/FSDP.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.frozen = False
        self.hooks = []

    def set_frozen(self, model, frozen: bool) -> None:
        self.frozen = frozen
        set_vision_trainable(model, not frozen)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = innermost_optimizer(optimizer)
        if not any(group.get("vision") for group in inner.param_groups):
            raise ValueError("--vision_freeze_steps needs the vision parameters in param groups of their own "
                             "(VisionParamGroups); the optimizer has none marked `vision`.")
        held_out = {}

        def hold_out(opt, args, kwargs):  # ZeRO-3 steps one sub-group at a time: each call sees its own params
            if self.frozen:
                for index, group in enumerate(opt.param_groups):
                    if group.get("vision"):
                        held_out[index], group["params"] = group["params"], []

        def put_back(opt, args, kwargs):
            for index, params in held_out.items():
                opt.param_groups[index]["params"] = params
            held_out.clear()

        self.hooks = [inner.register_step_pre_hook(hold_out), inner.register_step_post_hook(put_back)]
        self.set_frozen(model, state.global_step < self.steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.frozen and state.global_step >= self.steps:
            self.set_frozen(model, False)

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.remove()


class ImageSensitivityCallback(TrainerCallback):
    """Logs how much the loss depends on the images: (loss with images rolled across the batch) / loss - 1.

    Near 0 means the model answers from the text prior alone (the image features collapsed).
    """

    def __init__(self, probe_batch: dict, every: int):
        self.probe_batch, self.every = probe_batch, every
        self.history: list[tuple[int, float]] = []

    @torch.no_grad()
    def measure(self, model) -> float:
        was_training = model.training
        model.eval()
        batch = {key: value.to(model.device) for key, value in self.probe_batch.items()}
        loss = model(**batch).loss.item()
        shuffled = dict(batch, pixel_values=batch["pixel_values"].roll(1, dims=0))
        shuffled_loss = model(**shuffled).loss.item()
        model.train(was_training)
        return shuffled_loss / loss - 1.0

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and model is not None and logs is not None:
            value = round(self.measure(model), 4)
            self.history.append((state.global_step, value))
            print(f"step {state.global_step}: image_sensitivity {value}", flush=True)
            logs["image_sensitivity"] = value
            if state.log_history:
                state.log_history[-1]["image_sensitivity"] = value


def configure_stage(model, args: FlorenceVLArguments) -> None:
    if args.stage not in ("pretrain", "finetune"):
        raise ValueError(f"--stage {args.stage!r} is not supported; use 'pretrain' or 'finetune'.")
    if is_quantized(model):  # QLoRA: freeze the base, full-precision non-quantized weights; PEFT adds the adapters
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # the Trainer applies its own
        return
    model.requires_grad_(True)
    if args.stage == "finetune":  # frozen vision builds no autograd graph: no activations are kept for it
        set_vision_trainable(model, False)


def build_trainer(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig,
                  args: FlorenceVLArguments) -> SFTTrainer:
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(args, model_args, training_args)
    training_args.model_init_kwargs = None  # applied above; SFTTrainer would only warn that it ignores them
    configure_stage(model, args)
    train_dataset = load_train_dataset(args, script_args)

    peft_config = get_peft_config(model_args)
    if peft_config is None and is_quantized(model):
        raise ValueError("A model loaded with --load_in_4bit/--load_in_8bit trains only through adapters: add "
                         "--use_peft true (QLoRA).")
    if peft_config is not None:
        if not model_args.lora_target_modules:
            peft_config.target_modules = LLM_LORA_TARGETS
        if not model_args.lora_modules_to_save:
            peft_config.modules_to_save = ["multi_modal_projector"]

    warmup = args.vision_freeze_steps > 0 and args.stage == "pretrain"
    if warmup and training_args.world_size > 1:
        training_args.ddp_find_unused_parameters = True

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    if warmup and not any(parameter.requires_grad for name, parameter in trainer.model.named_parameters()
                          if VISION_TOWER_PREFIX in name):
        raise ValueError(f"--vision_freeze_steps {args.vision_freeze_steps}: nothing of the vision part is trained "
                         "here (--use_peft or a quantized model keeps it frozen throughout), so there is no warm-up to "
                         "hold it for; drop --vision_freeze_steps.")
    if warmup or args.vision_learning_rate is not None:
        optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(training_args, trainer.model)
        if "params" in optimizer_kwargs or "model" in optimizer_kwargs or "optimizer_dict" in optimizer_kwargs:
            raise ValueError(f"--optim {training_args.optim} builds its own parameter groups, so it cannot take "
                             "--vision_learning_rate or --vision_freeze_steps; use an AdamW or SGD --optim.")
        trainer.optimizer_cls_and_kwargs = (VisionParamGroups, dict(
            optimizer_cls=optimizer_cls, optimizer_kwargs=optimizer_kwargs, vision_lr=args.vision_learning_rate,
            weight_decay=training_args.weight_decay, decay_parameter_names=trainer.get_decay_parameter_names))
    if warmup:
        trainer.add_callback(VisionWarmupCallback(args.vision_freeze_steps))
    if args.image_sensitivity_steps:
        probe = [train_dataset[i] for i in range(min(8, len(train_dataset)))]
        trainer.add_callback(ImageSensitivityCallback(trainer.data_collator(probe), args.image_sensitivity_steps))
    return trainer


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose save finished (`trainer_state.json`, written last, exists).

    A process killed mid-save leaves a partial `checkpoint-N` that transformers' `get_last_checkpoint` would pick.
    """
    folders = [path for path in Path(output_dir).glob("checkpoint-*")
               if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()]
    return str(max(folders, key=lambda path: int(path.name.split("-")[-1]))) if folders else None


def resume_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a folder as given, or `true` for the last complete checkpoint of the run."""
    if resume is None or resume is False or str(resume).lower() in ("false", "no", ""):
        return None
    if resume is True or str(resume).lower() in ("true", "yes", "last"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint-N folder (with "
                             f"trainer_state.json) in {output_dir!r}; give a checkpoint folder or start afresh.")
        return checkpoint
    return resume


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig, args: FlorenceVLArguments):
    trainer = build_trainer(script_args, training_args, model_args, args)
    processor = trainer.processing_class
    if training_args.bf16 and trainer.accelerator.device.type == "cpu":
        logger.warning(
            "Training on CPU with bf16 autocast (TRL's default): on CPUs without native bf16 (AVX512-BF16/AMX) this "
            "is several times slower (6.4x for the tiny shapes recipe on a 2-core AMD EPYC); pass --bf16 false.")
    checkpoint = resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if checkpoint is not None:
        trainer.accelerator.print(f"Resuming from {checkpoint}.")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub()
    # Destroy the process group before exit: left to interpreter teardown, gloo's threads sometimes abort a rank
    # ("terminate called without an active exception", exit -6) after a complete save.
    trainer.accelerator.end_training()
    return trainer


def make_parser():
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, FlorenceVLArguments))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
