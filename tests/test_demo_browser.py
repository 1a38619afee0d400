"""`florence-vl demo`: the Gradio app, started through the CLI, used in headless Chromium and via gradio_client.

Needs the `demo` extra (gradio, selenium) and Debian's chromium + chromium-driver (tests/install_browser.sh).
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
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest
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


def start(command: list[str], port: int, log: Path, cwd: Path = REPO):
    """Start a server process and wait until its page answers on `port`; return (process, url)."""
    process = subprocess.Popen(command, cwd=cwd, env={**ENV, "GRADIO_SERVER_PORT": str(port)},
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`florence-vl demo` on the shipped tiny checkpoint, on a free loopback port."""
    log = tmp_path_factory.mktemp("demo") / "server.log"
    port = free_port()
    command = [sys.executable, "-m", "florence_vl.cli", "demo", "--host", "127.0.0.1", "--port", str(port),
               "--concurrency-limit", "3"]  # more than one answer at a time: generate() runs in parallel threads
    process, url = start(command, port, log)
    assert "3 answer(s) at a time" in log.read_text()
    yield url
    alive = process.poll() is None
    stop(process)
    assert alive, f"the demo server died:\n{log.read_text()[-3000:]}"


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


def test_exported_space_runs_without_the_package(tmp_path):
    """`florence-vl demo --export-space DIR` writes a folder that `python app.py` serves as a Space would."""
    space = tmp_path / "space"
    result = subprocess.run([sys.executable, "-m", "florence_vl.cli", "demo", "--export-space", str(space)],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"app.py", "dtypes.py", "requirements.txt", "README.md", "examples", "model"} <= {
        p.name for p in space.iterdir()}
    assert "sdk: gradio\nsdk_version: 6." in (space / "README.md").read_text()
    assert "transformers>=5.24,<6" in (space / "requirements.txt").read_text()
    blocked = "import sys, runpy; sys.modules['florence_vl'] = None; runpy.run_path('app.py', run_name='__main__')"
    process, url = start([sys.executable, "-c", blocked], free_port(), tmp_path / "space.log", cwd=space)
    try:
        answer = Client(url, verbose=False).predict(handle_file(str(EXAMPLES / "shapes_3.png")), QUESTION,
                                                    api_name="/ask")
        assert normalize(answer) == "cat"
    finally:
        stop(process)


def test_cli_demo_errors_are_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "florence_vl.cli", "demo", "--model", str(tmp_path / "missing")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"florence-vl: error: model folder {str(tmp_path / 'missing')!r} does not exist"], result.stderr
