"""A Gradio web demo for a Florence-VL checkpoint: upload or paste an image, ask about it, follow up.

Run it with `florence-vl demo` (needs `pip install 'florence-vl[demo]'`). This file depends only on
gradio, torch, transformers and Pillow (the model code comes with the checkpoint through
`trust_remote_code`), so `florence-vl demo --export-space DIR` can copy it unchanged into a Hugging Face
Space as `app.py`, where `python app.py` serves the model `DIR/model.txt` names (or `$FLORENCE_VL_MODEL`).
The app opens only files Gradio received as uploads (see `read_upload`), never a server path a client names.
"""

import io
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event, Thread

import gradio as gr
import gradio.utils as gradio_utils
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
MAX_PIXELS = 40_000_000      # larger images are refused with a message (the processor resizes anyway)
MAX_FILE_SIZE = 20 * gr.FileSize.MB  # Gradio refuses bigger uploads; the server never reads more than this
MAX_QUESTION_CHARS = 2_000
GRADIO_VERSION = "6.31.0"    # written into exported Spaces; the version the browser tests ran with
NOT_UPLOADED = ("the image must be a file uploaded to this app (attach it in the page, or send it with gradio_client's"
                " handle_file); paths on the server are not opened")
# What an exported Space installs: the versions the tests ran with, and torch's CPU build (a Space's free hardware
# has no GPU; PyPI's Linux torch wheel is the CUDA build, with several GB of nvidia-* packages). pip would prefer
# 2.13.0+cpu from the extra index for a plain `torch==2.13.0` too, but `+cpu` is explicit and exists only on
# PyTorch's index: a lost index line makes the install fail instead of quietly resolving the CUDA build.
SPACE_REQUIREMENTS = {
    "cpu": ["--extra-index-url https://download.pytorch.org/whl/cpu", "torch==2.13.0+cpu"],
    "cuda": ["torch==2.13.0"],  # PyPI's Linux wheel is the CUDA build
}
SPACE_PINS = [f"gradio=={GRADIO_VERSION}", "transformers==5.25.0", "pillow==12.3.0"]


def default_model() -> str:
    """`$FLORENCE_VL_MODEL`, else what `model.txt` beside this file names (an exported Space: a model folder beside
    it, kept under the checkpoint's own name so the page shows that name, or a Hub id), else the tiny checkpoint."""
    if os.environ.get("FLORENCE_VL_MODEL"):
        return os.environ["FLORENCE_VL_MODEL"]
    if (HERE / "model.txt").exists():
        model = (HERE / "model.txt").read_text().strip()
        return str(HERE / model) if (HERE / model / "config.json").exists() else model
    return str(HERE / "checkpoints" / "florence-vl-tiny-shapes")


def default_concurrency(device: str) -> int:
    """How many answers are generated at once: one per two CPU cores (at least one), four on an accelerator."""
    if device.startswith("cpu"):
        return max(1, min(4, (os.cpu_count() or 1) // 2))
    return 4


def read_upload(path: str | os.PathLike) -> bytes:
    """The bytes of a file Gradio received as an upload, or ValueError(NOT_UPLOADED).

    A client chooses the path it sends, so only a regular file whose real path (symlinks resolved) lies in Gradio's
    upload folder is read: a path elsewhere, a missing file, a FIFO, a device or a folder all get the same message
    (the answer tells nothing about the server's files), nothing is opened that could block the worker (the check
    is made on the opened descriptor too, opened non-blocking), and at most MAX_FILE_SIZE bytes are read.
    """
    uploads = Path(gradio_utils.get_upload_folder()).resolve()  # where Gradio's /upload route writes
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(uploads):
        raise ValueError(NOT_UPLOADED)
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise ValueError(NOT_UPLOADED)
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as error:
        raise ValueError(NOT_UPLOADED) from error
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # replaced since os.stat
            raise ValueError(NOT_UPLOADED)
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_FILE_SIZE + 1)
    finally:
        os.close(descriptor)
    if len(data) > MAX_FILE_SIZE:
        raise ValueError(f"{real.name!r} is larger than {MAX_FILE_SIZE // gr.FileSize.MB} MB; upload a smaller image")
    return data


def uploaded_path(value) -> str:
    """The path in an `/ask` request's image, which must be Gradio file data (`handle_file`), not a bare path."""
    if isinstance(value, gr.FileData):
        return value.path
    if isinstance(value, dict) and (value.get("meta") or {}).get("_type") == "gradio.FileData" \
            and isinstance(value.get("path"), str):
        return value["path"]
    raise ValueError(NOT_UPLOADED)


def open_image(data: bytes, name: str) -> Image.Image:
    """Decode an uploaded file as an RGB image, or raise ValueError saying what is wrong with it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{name!r} is too large ({width}×{height} = {width * height / 1e6:.0f} megapixels);"
                                 f" this demo accepts images up to {MAX_PIXELS / 1e6:.0f} megapixels")
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name!r} is too large ({error}); this demo accepts images up to "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{name!r} is not an image file; upload a PNG, JPEG, WebP, GIF or BMP image") from error
    except OSError as error:
        raise ValueError(f"{name!r} cannot be read as an image ({error})") from error


def open_upload(path: str | os.PathLike) -> Image.Image:
    """The uploaded image at `path` (see read_upload), or ValueError."""
    return open_image(read_upload(path), Path(path).name)


def count_parameters(model: torch.nn.Module) -> str:
    total = sum(parameter.numel() for parameter in model.parameters())
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if total >= size:
            return f"{total / size:.2f} {unit}"
    return str(total)


@dataclass
class Conversation:
    """What the model sees: one image (in the first user turn) and the questions and answers so far."""

    image: Image.Image | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, question: str) -> list[dict]:
        messages = []
        for index, (asked, answered) in enumerate([*self.turns, (question, None)]):
            content = [{"type": "text", "text": asked}]
            if index == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            if answered is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        return messages


class StopOnEvent(StoppingCriteria):
    """Ends generation once `event` is set (the page's Stop button)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Chat:
    """A loaded model and processor that stream answers to questions about one image."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32"):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        if os.sep in model_path and not Path(model_path).exists():
            raise ValueError(f"model folder {model_path!r} does not exist")
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                model_path, trust_remote_code=True, dtype=getattr(torch, dtype)).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
        except OSError as error:
            raise ValueError(f"cannot load model {model_path!r}: {str(error).splitlines()[0]}") from error
        self.name = model_path.rstrip("/").rsplit("/", 1)[-1] if Path(model_path).is_dir() else model_path
        self.size = count_parameters(self.model)
        self.device, self.dtype = device, dtype
        text_config = self.model.config.get_text_config()
        self.max_length = getattr(text_config, "max_position_embeddings", None)

    def stream(self, conversation: Conversation, question: str, max_new_tokens: int, temperature: float,
               stop: Event | None = None):
        """Yield the answer so far after each new piece of text (greedy when `temperature` is 0) until `stop` is set."""
        prompt = self.processor.apply_chat_template(conversation.messages(question), add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=conversation.image, return_tensors="pt").to(self.model.device)
        prompt_length = inputs["input_ids"].shape[1]
        if self.max_length is not None:
            if prompt_length >= self.max_length:
                raise ValueError(f"the conversation is too long for this model ({prompt_length} tokens, it reads at "
                                 f"most {self.max_length}); upload the image again to start a new conversation")
            max_new_tokens = min(max_new_tokens, self.max_length - prompt_length)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure, stopping = [], StoppingCriteriaList([StopOnEvent(stop)] if stop is not None else [])

        def generate():
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                        stopping_criteria=stopping, **sampling)
            except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread below
                failure.append(error)
                streamer.end()

        thread = Thread(target=generate, daemon=True)
        thread.start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield answer
        thread.join()
        if failure:
            raise failure[0]


def respond(chat: Chat, message: dict, history: list, conversation: Conversation | None,
            max_new_tokens: int, temperature: float, stop: Event | None = None):
    """The submit handler: yields (chatbot history, conversation, textbox value, status message)."""
    conversation = conversation or Conversation()
    text = (message or {}).get("text", "").strip()
    files = (message or {}).get("files", [])

    def fail(reason: str):
        return history, conversation, gr.MultimodalTextbox(value={"text": text, "files": []}), f"⚠️ **{reason}**"

    if files:
        path = files[-1] if isinstance(files[-1], str) else files[-1]["path"]
        try:
            image = open_upload(path)
        except ValueError as error:
            yield fail(f"Cannot use this file: {error}.")
            return
        conversation, history = Conversation(image=image), [{"role": "user", "content": {"path": path}}]
    if conversation.image is None:
        yield fail("Upload or paste an image first (the 📎 button, drag and drop, or Ctrl+V), then ask about it.")
        return
    if not text:
        yield fail("The question is empty: type a question about the image.")
        return
    if len(text) > MAX_QUESTION_CHARS:
        yield fail(f"The question is {len(text)} characters long; ask in at most {MAX_QUESTION_CHARS}.")
        return
    answer, shown = "", [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    try:
        for answer in chat.stream(conversation, text, int(max_new_tokens), float(temperature), stop):
            shown = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            yield shown, conversation, gr.MultimodalTextbox(value=None), ""
    except ValueError as error:  # raised before the first piece: the conversation is too long
        yield fail(f"{str(error)[:1].upper()}{str(error)[1:]}.")
        return
    conversation = Conversation(image=conversation.image, turns=[*conversation.turns, (text, answer.strip())])
    yield shown, conversation, gr.MultimodalTextbox(value=None), ""


def build_app(chat: Chat, concurrency_limit: int = 1, max_new_tokens: int = 48) -> gr.Blocks:
    """The page: chat on the left; model, examples and generation settings on the right."""
    with gr.Blocks(title=f"Florence-VL demo: {chat.name}") as app:
        gr.Markdown(f"# Florence-VL\nAsk questions about an image. Model **{chat.name}** · **{chat.size}** "
                    f"parameters · {chat.device} · {chat.dtype}", elem_id="model-info")
        conversation = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=460,
                                     placeholder="Upload or paste an image and ask a question. Follow-up questions "
                                                 "keep the conversation; a new image starts a new one.")
                textbox = gr.MultimodalTextbox(
                    label="Image and question", elem_id="question", file_count="single",
                    sources=["upload"], placeholder="Ask about the image (attach or paste a new image to start over)")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                with gr.Accordion("Generation settings", open=True):
                    max_new_tokens = gr.Slider(1, 512, value=max_new_tokens, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                with gr.Row():
                    stop_button = gr.Button("Stop", elem_id="stop")
                    new_chat = gr.Button("New conversation", elem_id="new-conversation")
                examples = json.loads((EXAMPLES_DIR / "examples.json").read_text()) \
                    if (EXAMPLES_DIR / "examples.json").exists() else []
                if examples:
                    gr.Examples([[{"text": example["question"], "files": [str(EXAMPLES_DIR / example["image"])]}]
                                 for example in examples], inputs=[textbox], label="Examples (click, then send)",
                                elem_id="examples")

        running: dict[str, Event] = {}  # session -> the Stop signal of its answer in progress

        def handler(message, history, state, tokens, temp, request: gr.Request):
            stop = running[request.session_hash] = Event()
            try:
                yield from respond(chat, message, history, state, tokens, temp, stop)
            finally:
                if running.get(request.session_hash) is stop:
                    del running[request.session_hash]

        def stop_answer(request: gr.Request):
            if request.session_hash in running:
                running[request.session_hash].set()

        textbox.submit(handler, [textbox, chatbot, conversation, max_new_tokens, temperature],
                       [chatbot, conversation, textbox, status], concurrency_limit=concurrency_limit,
                       concurrency_id="model", api_name="chat")
        stop_button.click(stop_answer, None, None, queue=False, api_name=False)
        new_chat.click(lambda: ([], None, ""), None, [chatbot, conversation, status], queue=False, api_name=False)
    return app


def add_api(app: gr.Blocks, chat: Chat, concurrency_limit: int) -> None:
    """A stateless `/ask` endpoint (image file + question -> answer) for scripts and `gradio_client`."""

    def ask(image: gr.FileData, question: str, max_new_tokens: int = 48, temperature: float = 0.0) -> str:
        """Answer one question about one image (greedy when temperature is 0)."""
        try:
            if not question.strip():
                raise ValueError("the question is empty: type a question about the image")
            answer = ""
            for answer in chat.stream(Conversation(image=open_upload(uploaded_path(image))), question.strip(),
                                      int(max_new_tokens), float(temperature)):
                pass
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return answer.strip()

    with app:
        gr.api(ask, api_name="ask", concurrency_limit=concurrency_limit, concurrency_id="model")


def launch(model: str | None = None, host: str | None = None, port: int | None = None, device: str = "cpu",
           dtype: str = "float32", concurrency_limit: int | None = None, share: bool = False,
           max_new_tokens: int = 48) -> None:
    """Load the model and serve the demo until interrupted."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    chat = Chat(model or default_model(), device, dtype)
    limit = concurrency_limit or default_concurrency(device)
    app = build_app(chat, limit, max_new_tokens)
    add_api(app, chat, limit)
    app.queue(default_concurrency_limit=limit, max_size=64)
    print(f"Florence-VL demo: {chat.name} ({chat.size} parameters) on {device}, {limit} answer(s) at a time",
          flush=True)
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE, show_error=True,
               allowed_paths=[str(EXAMPLES_DIR)], theme=gr.themes.Soft(),
               css="#status * { color: #b91c1c !important; }")  # messages about bad input in red


def export_space(directory: str | Path, model: str | None = None, device: str = "cpu") -> Path:
    """Write a folder a Hugging Face Space runs as-is: app.py (this file), requirements, examples, the model.

    `device` picks the torch build in requirements.txt: `cpu` (the default, a Space's free hardware) or `cuda`.
    A local model folder is copied beside app.py under its own name, which the page's header then shows.
    """
    directory = Path(directory)
    model = model or default_model()
    if device.split(":")[0] not in SPACE_REQUIREMENTS:
        raise ValueError(f"cannot export a Space for device {device!r}; use --device cpu or --device cuda")
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{str(directory)!r} exists and is not empty; give a new folder")
    name = Path(model).resolve().name if Path(model).is_dir() else None
    if name in {"app.py", "examples", "requirements.txt", "README.md", "model.txt"}:
        raise ValueError(f"the model folder's name {name!r} clashes with a file of the Space; rename the folder")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, directory / "app.py")
    if EXAMPLES_DIR.is_dir():
        shutil.copytree(EXAMPLES_DIR, directory / "examples")
    if name:
        shutil.copytree(model, directory / name)
        model_line = f"The model is in `{name}/`."
    else:
        model_line = f"The model is `{model}` on the Hub (set the `FLORENCE_VL_MODEL` variable to change it)."
    (directory / "model.txt").write_text(f"{name or model}\n")
    (directory / "requirements.txt").write_text(
        "\n".join([*SPACE_REQUIREMENTS[device.split(":")[0]], *SPACE_PINS]) + "\n")
    gpu_line = " For GPU hardware: set the Space variable `FLORENCE_VL_DEVICE=cuda`." if device.startswith("cuda") \
        else " It installs torch's CPU build (for a GPU, export with `--device cuda`)."
    (directory / "README.md").write_text(
        f"---\ntitle: Florence-VL demo\nemoji: 🖼️\ncolorFrom: blue\ncolorTo: green\nsdk: gradio\n"
        f"sdk_version: {GRADIO_VERSION}\npython_version: \"3.11\"\napp_file: app.py\npinned: false\n"
        f"license: apache-2.0\n---\n\n"
        f"# Florence-VL demo\n\nAsk questions about an image with a Florence-VL model (arXiv 2412.04424). "
        f"{model_line}{gpu_line}\n")
    return directory


if __name__ == "__main__":  # a Space runs `python app.py`; Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
    launch(device=os.environ.get("FLORENCE_VL_DEVICE", "cpu"))
