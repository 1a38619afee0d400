"""The `florence-vl` command line: chat about an image, evaluate on shapes-and-words, convert checkpoints."""

import argparse
import importlib
import os
import sys
from pathlib import Path
from threading import Thread

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "checkpoints" / "florence-vl-tiny-shapes")


class UsageError(Exception):
    """A problem with what the user gave: printed as one line, exit code 2."""


def require_extra(extra: str, *modules: str) -> None:
    """Raise a UsageError naming the pip extra when one of `modules` cannot be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UsageError(f"this command needs the {extra!r} extra ({module} is not installed): "
                             f"pip install 'florence-vl[{extra}]'") from error


def load(model_path: str, device: str = "cpu", dtype: str = "float32"):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()
    if os.path.sep in model_path and not Path(model_path).exists():
        raise UsageError(f"model folder {model_path!r} does not exist")
    if Path(model_path).is_dir() and not (Path(model_path) / "config.json").exists():
        raise UsageError(f"{model_path!r} is not a model folder (no config.json)")
    if not hasattr(torch, dtype):
        raise UsageError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16")
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True,
                                                            dtype=getattr(torch, dtype))
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load model {model_path!r}: {str(error).splitlines()[0]}") from error
    return model.to(device).eval(), processor


def open_image(path: str):
    from PIL import Image

    if not Path(path).is_file():
        raise UsageError(f"image file {path!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except OSError as error:
        raise UsageError(f"cannot read image {path!r}: {error}") from error


def answer(model, processor, image, question: str, max_new_tokens: int = 32, stream: bool = False) -> str:
    """Greedy answer to one question about one image; with `stream`, tokens are printed as they come."""
    from transformers import TextIteratorStreamer

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=image, return_tensors="pt").to(model.device)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if not stream:
        output = model.generate(**kwargs)
        return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs=dict(kwargs, streamer=streamer))
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        print(piece, end="", flush=True)
    thread.join()
    print()
    return "".join(pieces).strip()


def chat(args) -> None:
    if not args.interactive and (args.image is None or args.question is None):
        raise UsageError("give an IMAGE and a QUESTION, or --interactive")
    image = open_image(args.image) if args.image else None
    model, processor = load(args.model, args.device, args.dtype)
    if not args.interactive:
        text = answer(model, processor, image, args.question, args.max_new_tokens, args.stream)
        if not args.stream:
            print(text)
        return
    image_name = Path(args.image).name if args.image else None
    print("Type a question about the image, ':image PATH' to change the image, ':quit' to leave.")
    while True:
        try:
            line = input(f"[{image_name or 'no image'}] > ").strip()
        except EOFError:
            print()
            break
        if line in (":quit", ":q"):
            break
        if line.startswith(":image "):
            path = line.split(" ", 1)[1].strip()
            try:
                image, image_name = open_image(path), Path(path).name
                print(f"image: {path}")
            except UsageError as error:
                print(f"error: {error}")
            continue
        if not line:
            continue
        if image is None:
            print("error: no image yet; use ':image PATH'")
            continue
        text = answer(model, processor, image, line, args.max_new_tokens, args.stream)
        if not args.stream:
            print(text)


def eval_shapes(args) -> None:
    from florence_vl.train.shapes import evaluate, record_results

    if args.record and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--record writes into a local model folder; {args.model!r} is not one")
    model, processor = load(args.model, args.device, args.dtype)

    def answer_batch(images, questions):
        import torch

        prompts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True) for question in questions]
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    scores = evaluate(answer_batch, n=args.n, seed=args.seed, batch_size=args.batch_size)
    for name, value in scores.items():
        print(f"{name:>12}: {value:.3f}" if isinstance(value, float) else f"{name:>12}: {value}")
    if args.record:
        record_results(args.model, scores, args.seed)
        print(f"recorded in {Path(args.model) / 'eval_results.json'} and its README.md")


def convert(args) -> None:
    from florence_vl.convert import convert_original

    try:
        print(convert_original(args.src, args.dst, image_size=args.image_size, florence2_config=args.florence2_config,
                               image_token_id=args.image_token_id, base_models=args.base_model).summary())
    except ValueError as error:
        raise UsageError(str(error)) from error


def demo(args) -> None:
    require_extra("demo", "gradio")
    from florence_vl import demo as web_demo

    try:
        if args.export_space:
            folder = web_demo.export_space(args.export_space, args.model, args.device)
            print(f"Space folder written to {folder}; upload it with: hf upload --repo-type space USER/NAME {folder}")
            return
        web_demo.launch(args.model, args.host, args.port, args.device, args.dtype, args.concurrency_limit,
                        args.share, args.max_new_tokens)
    except ValueError as error:
        raise UsageError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="florence-vl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(command):
        command.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (default: the "
                                                                     "shipped tiny shapes-and-words checkpoint)")
        command.add_argument("--device", default="cpu")
        command.add_argument("--dtype", default="float32")
        command.add_argument("--max-new-tokens", type=int, default=32)

    chat_parser = commands.add_parser("chat", help="answer a question about an image")
    chat_parser.add_argument("image", nargs="?")
    chat_parser.add_argument("question", nargs="?")
    chat_parser.add_argument("--interactive", action="store_true", help="read questions from stdin")
    chat_parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    model_options(chat_parser)
    chat_parser.set_defaults(run=chat)

    eval_parser = commands.add_parser("eval-shapes", help="exact-match accuracy on held-out shapes-and-words")
    eval_parser.add_argument("--n", type=int, default=500)
    eval_parser.add_argument("--seed", type=int, default=12345)
    eval_parser.add_argument("--batch-size", type=int, default=32)
    eval_parser.add_argument("--record", action="store_true", help="write the scores to MODEL/eval_results.json "
                                                                    "and into its model card (README.md)")
    model_options(eval_parser)
    eval_parser.set_defaults(run=eval_shapes)

    convert_parser = commands.add_parser("convert", help="convert an original Florence-VL checkpoint")
    convert_parser.add_argument("src")
    convert_parser.add_argument("dst")
    convert_parser.add_argument("--florence2-config", help="original Florence-2 config.json (default: "
                                "SRC/vision_tower/config.json, else Florence-2-large's when mm_hidden_size is 1024)")
    convert_parser.add_argument("--image-size", type=int, help="default: SRC/vision_tower/preprocessor_config.json")
    convert_parser.add_argument("--image-token-id", type=int, help="id of <image> when SRC has no tokenizer")
    convert_parser.add_argument("--base-model", action="append", default=[], help="Hub id for the model card's "
                                "base_model (repeatable)")
    convert_parser.set_defaults(run=convert)

    demo_parser = commands.add_parser("demo", help="serve a web demo (Gradio) in the browser")
    demo_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    demo_parser.add_argument("--port", type=int, default=None, help="default: 7860, or the next free port")
    demo_parser.add_argument("--concurrency-limit", type=int, default=None,
                             help="answers generated at once (default: one per two CPU cores, 4 on a GPU)")
    demo_parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    demo_parser.add_argument("--export-space", metavar="DIR", help="write a Hugging Face Space folder (app, "
                                                                   "requirements, examples, model) and exit")
    model_options(demo_parser)
    demo_parser.set_defaults(run=demo)

    from florence_vl.analysis import add_analyze_parser

    add_analyze_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UsageError as error:
        print(f"florence-vl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
