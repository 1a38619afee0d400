"""`florence-vl demo` and an exported Space: the Gradio app, started as users start it, used in headless Chromium,
via gradio_client and by raw HTTP requests that try to make it open server files.

Needs the `demo` extra (gradio), the `dev` extra (selenium) and Debian's chromium + chromium-driver
(tests/install_browser.sh).
Set FLORENCE_VL_UPDATE_SCREENSHOT=1 to also refresh the README's screenshot docs/demo.png.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest
from florence_vl.demo import NOT_UPLOADED, SPACE_PINS
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXAMPLE_LIST = json.loads((EXAMPLES / "examples.json").read_text())
QUESTION = "What word is written in the image?"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}


def normalize(text: str) -> str:
    text = text.strip().lower()
    return text.removesuffix(".")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, log: Path, cwd: Path = REPO, env: dict | None = None):
    """Start a server process and wait until its page answers on `port`; return (process, url)."""
    process = subprocess.Popen(command, cwd=cwd, env={**ENV, **(env or {}), "GRADIO_SERVER_PORT": str(port)},
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"the demo did not answer on {url} within 180 s:\n{log.read_text()[-3000:]}")


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


class App:
    """A running app (the demo or an exported Space) with its own Gradio upload folder (GRADIO_TEMP_DIR)."""

    def __init__(self, command: list[str], folder: Path, cwd: Path = REPO):
        self.uploads, self.log = folder / "uploads", folder / "server.log"
        self.uploads.mkdir()
        self.process, self.url = start(command, free_port(), self.log, cwd, {"GRADIO_TEMP_DIR": str(self.uploads)})

    def close(self) -> None:
        alive = self.process.poll() is None
        stop(self.process)
        assert alive, f"the app died:\n{self.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    """`florence-vl demo` on the shipped tiny checkpoint, on a free loopback port."""
    app = App([sys.executable, "-m", "florence_vl.cli", "demo", "--host", "127.0.0.1", "--concurrency-limit", "3"],
              tmp_path_factory.mktemp("demo"))  # more than one answer at a time: generate() runs in parallel threads
    assert "3 answer(s) at a time" in app.log.read_text()
    yield app
    app.close()


@pytest.fixture(scope="module")
def server(demo_app):
    return demo_app.url


@pytest.fixture(scope="module")
def space_app(tmp_path_factory):
    """`florence-vl demo --export-space DIR`, then its app.py served as a Space does, without this package."""
    folder = tmp_path_factory.mktemp("space")
    result = subprocess.run([sys.executable, "-m", "florence_vl.cli", "demo", "--export-space", str(folder / "space")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    blocked = "import sys, runpy; sys.modules['florence_vl'] = None; runpy.run_path('app.py', run_name='__main__')"
    app = App([sys.executable, "-c", blocked], folder, cwd=folder / "space")
    app.space = folder / "space"
    yield app
    app.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if chromium is None or not Path(driver_path).exists():
        pytest.skip("Chromium is not installed: run `bash tests/install_browser.sh` "
                    "(apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    yield driver
    driver.quit()


class Page:
    """The demo page as a user sees it."""

    def __init__(self, driver, url: str, screenshots: Path):
        self.driver, self.screenshots, self.step = driver, screenshots, 0
        driver.get(url)
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"), "the question box")

    def wait(self, condition, what: str, timeout: float = 30):
        return WebDriverWait(self.driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(
            condition, f"timed out waiting for {what}")  # elements are re-rendered while answers stream

    def box(self):
        return self.driver.find_element(By.ID, "question")

    def answers(self) -> list[str]:
        return [element.text for element in self.driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')]

    def status(self) -> str:
        return self.driver.find_element(By.ID, "status").text

    def attach(self, path: Path) -> None:
        self.box().find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
        self.wait(lambda d: self.box().find_elements(By.CSS_SELECTOR, ".thumbnail-item"), f"{path.name} attached")

    def paste(self, path: Path) -> None:
        """Paste an image file into the question box, as Ctrl+V with an image on the clipboard does."""
        self.driver.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
            const box = document.querySelector('#question textarea');
            box.focus();
            box.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
        """, base64.b64encode(path.read_bytes()).decode(), path.name)
        self.wait(lambda d: self.box().find_elements(By.CSS_SELECTOR, ".thumbnail-item"), f"{path.name} pasted")

    def ask(self, question: str) -> None:
        textarea = self.box().find_element(By.TAG_NAME, "textarea")
        textarea.send_keys(question)
        self.box().find_element(By.CSS_SELECTOR, "button.submit-button").click()

    def wait_answers(self, count: int) -> list[str]:
        """Wait until `count` answers are shown and the last one is complete (the queue has finished)."""
        self.wait(lambda d: len(self.answers()) >= count and self.answers()[-1].strip()
                  and not d.find_elements(By.CSS_SELECTOR, "#chatbot .pending, #question .generating"),
                  f"answer {count}")
        time.sleep(0.3)  # let the last streamed piece land
        return self.answers()

    def screenshot(self, name: str) -> Path:
        self.step += 1
        path = self.screenshots / f"{self.step}_{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def test_browser_conversation(server, browser, tmp_path):
    """Upload, ask, follow up; a bad file and an empty question get messages; an example or a paste starts over."""
    started = time.monotonic()
    page = Page(browser, server, tmp_path)
    text = page.driver.find_element(By.ID, "model-info").text
    assert "florence-vl-tiny-shapes" in text and "parameters" in text, text
    page.screenshot("empty")

    page.attach(EXAMPLES / "shapes_3.png")
    page.ask(QUESTION)
    assert normalize(page.wait_answers(1)[-1]) == "cat", page.answers()
    assert page.status() == ""
    first = page.screenshot("answered")

    page.ask("What shape is on the left?")
    answers = page.wait_answers(2)
    assert len(answers) == 2 and answers[0] == "cat" and answers[1].strip(), answers
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chatbot img")) == 1  # the image stays in the first turn
    page.screenshot("follow_up")

    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image")
    page.attach(not_image)
    page.ask("What is this?")
    page.wait(lambda d: "not an image file" in page.status(), "the not-an-image message")
    assert "notes.txt" in page.status() and len(page.answers()) == 2, (page.status(), page.answers())
    page.screenshot("not_an_image")

    assert not page.box().find_elements(By.CSS_SELECTOR, ".thumbnail-item")  # the bad file was dropped
    page.box().find_element(By.TAG_NAME, "textarea").send_keys(Keys.CONTROL, "a", Keys.DELETE)
    page.box().find_element(By.CSS_SELECTOR, "button.submit-button").click()
    page.wait(lambda d: "question is empty" in page.status(), "the empty-question message")
    page.screenshot("empty_question")

    example = EXAMPLE_LIST[0]  # clicking an example fills in its image and question; a new image starts over
    buttons = browser.find_elements(By.CSS_SELECTOR, "#examples button.gallery-item")
    assert len(buttons) == len(EXAMPLE_LIST)
    next(button for button in buttons if example["question"] in button.text).click()
    page.wait(lambda d: page.box().find_elements(By.CSS_SELECTOR, ".thumbnail-item"), "the example's image")
    assert page.box().find_element(By.TAG_NAME, "textarea").get_attribute("value") == example["question"]
    page.box().find_element(By.CSS_SELECTOR, "button.submit-button").click()
    page.wait(lambda d: page.answers() == [example["answer"]] and page.status() == "", "the new conversation's answer")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chatbot img")) == 1
    page.screenshot("example")

    example = EXAMPLE_LIST[1]  # a pasted image starts over too
    page.paste(EXAMPLES / example["image"])
    page.ask(example["question"])
    page.wait(lambda d: page.answers() == [example["answer"]] and page.status() == "", "the pasted image's answer")
    page.screenshot("pasted")

    browser.find_element(By.ID, "stop").click()  # nothing is running: nothing changes
    assert page.answers() == [example["answer"]] and page.status() == ""
    browser.find_element(By.ID, "new-conversation").click()  # forgets the image too
    page.wait(lambda d: page.answers() == [], "an empty conversation")
    page.ask(QUESTION)
    page.wait(lambda d: "Upload or paste an image first" in page.status(), "the no-image message")
    assert time.monotonic() - started < 120
    if os.environ.get("FLORENCE_VL_UPDATE_SCREENSHOT"):
        shutil.copyfile(first, REPO / "docs" / "demo.png")


def chat(client: Client, image: Path | None, question: str, history: list | None = None):
    message = {"text": question, "files": [handle_file(str(image))] if image else []}
    return client.submit(message, history or [], 48, 0.0, api_name="/chat")


def last_answer(history: list) -> str:
    return history[-1]["content"][0]["text"] if history and history[-1]["role"] == "assistant" else ""


def test_client_answer_streams_token_by_token(server):
    client = Client(server, verbose=False)
    job = chat(client, EXAMPLES / "shapes_3.png", QUESTION)
    history, _, status = job.result(timeout=60)
    assert normalize(last_answer(history)) == "cat" and status == ""

    example = EXAMPLE_LIST[4]  # the long caption
    job = chat(client, EXAMPLES / example["image"], example["question"])
    job.result(timeout=60)
    partials = [last_answer(output[0]) for output in job.outputs()]
    assert normalize(partials[-1]) == normalize(example["answer"])
    growing = [text for text in partials if text]
    assert len(set(growing)) >= 5, partials  # many intermediate states, not one final message
    assert all(b.startswith(a.rstrip()) for a, b in pairwise(growing)), growing


def test_client_eight_concurrent_users_all_answered(server):
    def ask(index: int) -> tuple[str, str]:
        example = EXAMPLE_LIST[index % len(EXAMPLE_LIST)]
        client = Client(server, verbose=False)
        answer = client.predict(handle_file(str(EXAMPLES / example["image"])), example["question"],
                                api_name="/ask")
        return normalize(answer), normalize(example["answer"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8), timeout=120))
    assert all(got == expected for got, expected in results), results


def test_client_bad_inputs_get_messages_and_the_server_keeps_working(server, tmp_path):
    client = Client(server, verbose=False)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (8000, 6000), "white").save(huge, compress_level=1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for image, question, message in [(None, QUESTION, "Upload or paste an image first"),  # the session's state
                                     (huge, QUESTION, "too large (8000×6000"),
                                     (broken, QUESTION, "'broken.png' is not an image file"),
                                     (EXAMPLES / "shapes_3.png", "   ", "question is empty"),
                                     (EXAMPLES / "shapes_3.png", "word " * 300, "conversation is too long")]:
        history, _, status = chat(client, image, question).result(timeout=60)
        assert message in status and not [turn for turn in history if turn["role"] == "assistant"], (message, status)
    with pytest.raises(AppError, match="not an image file"):
        client.predict(handle_file(str(broken)), QUESTION, api_name="/ask")
    history, _, status = chat(client, EXAMPLES / "shapes_3.png", QUESTION).result(timeout=60)
    assert normalize(last_answer(history)) == "cat" and status == ""


def test_follow_up_prompt_keeps_the_conversation_and_one_image():
    from florence_vl.demo import Conversation
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(REPO / "checkpoints" / "florence-vl-tiny-shapes", trust_remote_code=True)
    conversation = Conversation(image=Image.open(EXAMPLES / "shapes_3.png"), turns=[(QUESTION, "cat")])
    prompt = processor.apply_chat_template(conversation.messages("What shape is on the left?"),
                                           add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and prompt.index("<image>") < prompt.index(QUESTION)
    assert prompt.index(QUESTION) < prompt.index("cat") < prompt.index("What shape is on the left?")
    inputs = processor(text=prompt, images=conversation.image, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 1


def test_stop_ends_the_answer_early():
    """The Stop button's signal ends generation at the next token; without it the whole caption comes."""
    from threading import Event

    from florence_vl.demo import Chat, Conversation

    chat = Chat(str(REPO / "checkpoints" / "florence-vl-tiny-shapes"))
    example = EXAMPLE_LIST[4]
    conversation = Conversation(image=Image.open(EXAMPLES / example["image"]))
    full = list(chat.stream(conversation, example["question"], 48, 0.0, stop=Event()))[-1]
    assert normalize(full) == normalize(example["answer"])
    stop = Event()
    partial = ""
    for partial in chat.stream(conversation, example["question"], 48, 0.0, stop=stop):
        stop.set()  # pressed after the first piece arrived
    assert 0 < len(partial) < len(full) / 2 and full.startswith(partial.strip()), (partial, full)


def test_exported_space_runs_without_the_package(space_app):
    """`florence-vl demo --export-space DIR` writes a folder that `python app.py` serves as a Space would."""
    space = space_app.space
    assert {"app.py", "requirements.txt", "README.md", "model.txt", "examples", "florence-vl-tiny-shapes"} <= {
        path.name for path in space.iterdir()}
    card = (space / "README.md").read_text()
    assert "sdk: gradio\nsdk_version: 6." in card and 'python_version: "3.11"' in card  # what the tests ran on
    assert (space / "requirements.txt").read_text().splitlines() == [
        "--extra-index-url https://download.pytorch.org/whl/cpu", "torch==2.13.0+cpu", *SPACE_PINS]
    with urllib.request.urlopen(f"{space_app.url}config", timeout=30) as response:
        config = json.load(response)
    header = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "model-info")
    assert "Model **florence-vl-tiny-shapes**" in header, header  # the checkpoint's name, not the folder "model"
    answer = Client(space_app.url, verbose=False).predict(handle_file(str(EXAMPLES / "shapes_3.png")), QUESTION,
                                                          api_name="/ask")
    assert normalize(answer) == "cat"


def call(url: str, api_name: str, data: list) -> tuple[str, object]:
    """POST `data` to an endpoint as any HTTP client can (gradio_client would upload a local path itself); return
    the final event's kind and payload. Fails after 60 s (a worker blocked on a FIFO: the stream sends heartbeats)."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    deadline, kind = time.monotonic() + 60, None
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as response:
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind in ("complete", "error"):
                return kind, json.loads(line.removeprefix("data: "))
            assert time.monotonic() < deadline, f"no answer from /{api_name} within 60 s: is the worker blocked?"
    raise AssertionError(f"/{api_name}'s event stream ended without a result")


def file_data(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


# What Gradio itself answers for file data outside its upload folder (before the demo's code runs): it names only
# the path the client sent, whether or not that path exists.
NOT_BY_A_USER = "Cannot move PATH to the gradio cache dir because it was not uploaded by a user."
NOT_FILE_DATA = "(Gradio refuses a file without its metadata in /chat)"


def refusal(url: str, endpoint: str, image) -> str:
    """Send `image` to `/ask` or `/chat` by raw HTTP; assert no answer came; return the message, with the path the
    client sent replaced by PATH (Gradio's own refusal quotes it)."""
    if endpoint == "ask":
        kind, payload = call(url, "ask", [image, QUESTION, 48, 0.0])
        assert kind == "error", payload
        message = payload["error"]
    else:
        kind, payload = call(url, "chat", [{"text": QUESTION, "files": [image]}, [], 48, 0.0])
        assert kind == "error" or not [turn for turn in payload[0] if turn["role"] == "assistant"], payload
        message = payload["error"] if kind == "error" else \
            payload[-1].removeprefix("⚠️ **Cannot use this file: ").removesuffix(".**")
    if "The 'meta' field must be explicitly provided" in message:  # Gradio's check of the page's file data
        message = NOT_FILE_DATA
    return message.replace(image if isinstance(image, str) else image["path"], "PATH")


@pytest.mark.parametrize("endpoint", ["ask", "chat"])
@pytest.mark.parametrize("which", ["demo", "space"])
def test_only_uploaded_files_are_opened(which, endpoint, request, tmp_path):
    """Server paths sent as strings, dicts or Gradio file data are refused, with one message whether the path exists
    or not; a FIFO does not block the worker; at most 20 MB are read; the app answers an upload right after each."""
    app = request.getfixturevalue(f"{which}_app")
    secret = tmp_path / "secret.png"  # an image the server can read but nobody uploaded
    shutil.copyfile(EXAMPLES / "shapes_3.png", secret)
    os.mkfifo(tmp_path / "pipe.png")
    planted = app.uploads / f"planted-{uuid.uuid4().hex}"  # what a local user could put in the upload folder
    planted.mkdir()
    os.mkfifo(planted / "pipe.png")
    (planted / "secret.png").symlink_to(secret)
    (planted / "passwd.png").symlink_to("/etc/passwd")
    shutil.copyfile(EXAMPLES / "shapes_3.png", planted / "image.png")  # readable, but not sent as file data
    with open(planted / "big.png", "wb") as file:
        file.truncate(20 * 2**20 + 1)  # sparse: over the 20 MB cap without writing it
    attacks = {"a server path as a string": str(secret),
               "a dict without Gradio's file metadata": {"path": str(secret)},
               "a path in the upload folder as a string": str(planted / "image.png"),
               "a dict without metadata in the upload folder": {"path": str(planted / "image.png")},
               "/etc/passwd": file_data("/etc/passwd"),
               "an image outside the upload folder": file_data(secret),
               "a missing file": file_data(tmp_path / "missing.png"),
               "a FIFO": file_data(tmp_path / "pipe.png"),
               "a missing file in the upload folder": file_data(planted / "missing.png"),
               "a FIFO in the upload folder": file_data(planted / "pipe.png"),
               "a symlink out of the upload folder": file_data(planted / "secret.png"),
               "a symlink to /etc/passwd": file_data(planted / "passwd.png"),
               "the upload folder itself": file_data(app.uploads),
               "a file over 20 MB": file_data(planted / "big.png")}
    client, messages = Client(app.url, verbose=False), {}
    for what, image in attacks.items():
        messages[what] = refusal(app.url, endpoint, image)
        if endpoint == "ask":
            answer = client.predict(handle_file(str(EXAMPLES / "shapes_3.png")), QUESTION, api_name="/ask")
        else:
            answer = last_answer(chat(client, EXAMPLES / "shapes_3.png", QUESTION).result(timeout=60)[0])
        assert normalize(answer) == "cat", (what, answer)
    assert messages.pop("a file over 20 MB") == "'big.png' is larger than 20 MB; upload a smaller image"
    assert set(messages.values()) <= {NOT_UPLOADED, NOT_BY_A_USER, NOT_FILE_DATA}, messages
    assert messages["/etc/passwd"] == messages["an image outside the upload folder"] == messages["a missing file"]
    assert messages["a missing file in the upload folder"] == messages["a FIFO in the upload folder"] == \
        messages["the upload folder itself"] == NOT_UPLOADED
    if endpoint == "ask":  # Gradio's /chat refuses these itself; /ask leaves them to the demo
        assert messages["a server path as a string"] == messages["a dict without Gradio's file metadata"] == \
            messages["a path in the upload folder as a string"] == NOT_UPLOADED


def test_cli_demo_errors_are_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "florence_vl.cli", "demo", "--model", str(tmp_path / "missing")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"florence-vl: error: model folder {str(tmp_path / 'missing')!r} does not exist"], result.stderr


def test_space_requirements_resolve_to_torch_cpu_and_the_tested_pins(tmp_path):
    """The exported requirements.txt resolves (`pip install --dry-run`: nothing installed) to torch's CPU build and
    the pinned gradio/transformers/pillow, with no nvidia-* package. PyTorch's index is unreachable from this machine:
    the same `+cpu` wheel comes from pip's configured find-links, so the index line is left out of the dry run."""
    from florence_vl.demo import export_space

    lines = (export_space(tmp_path / "space") / "requirements.txt").read_text().splitlines()
    assert lines[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    (tmp_path / "here.txt").write_text("\n".join(lines[1:]) + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                             "--report", str(tmp_path / "report.json"), "-r", str(tmp_path / "here.txt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert resolved["torch"] == "2.13.0+cpu"
    assert [f"{name}=={resolved[name]}" for name in ("gradio", "transformers", "pillow")] == SPACE_PINS
    assert not [name for name in resolved if name.startswith("nvidia")], resolved

    cuda = (export_space(tmp_path / "gpu-space", device="cuda") / "requirements.txt").read_text().splitlines()
    assert cuda == ["torch==2.13.0", *SPACE_PINS]  # PyPI's Linux wheel: the CUDA build, for GPU hardware
    with pytest.raises(ValueError, match="'mps'.*--device cpu or --device cuda"):
        export_space(tmp_path / "other", device="mps")
