"""The shipped tiny shapes-and-words checkpoint: the README demo, the pipeline and the CLI answer correctly."""

import configparser
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from florence_vl.train.shapes import QUESTION_TYPES, record_results

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "florence-vl-tiny-shapes"
EXAMPLES = json.loads((REPO / "examples" / "examples.json").read_text())
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def normalize(text: str) -> str:
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") else text


@pytest.mark.parametrize("name", ["modeling_florence_vl.py", "configuration_florence_vl.py", "processing_florence_vl.py"])
def test_checkpoint_code_equals_the_package(name):
    assert filecmp.cmp(CHECKPOINT / name, REPO / name, shallow=False), f"{name} in the checkpoint is stale"


def test_card_and_readme_figures_are_the_recorded_ones():
    """The shipped card's and README's scores are those `eval-shapes --record` wrote, not typed by hand."""
    record = json.loads((CHECKPOINT / "eval_results.json").read_text())
    scores = record["scores"]
    card = ModelCard.load(CHECKPOINT / "README.md")
    assert {result.metric_name: result.metric_value for result in card.data.eval_results} == {
        f"exact match ({name})": round(value, 3) for name, value in scores.items()}
    figures = set(re.findall(r"(?<![\d.])\d\.\d{3}(?!\d)", card.text))  # every score-like number
    assert figures == {f"{value:.3f}" for value in scores.values()}, figures
    assert f"{scores['overall']:.3f} overall" in card.text and f"{record['n']} images of seed {record['seed']}" in card.text
    row = "| " + " | ".join(f"{scores[name]:.3f}" for name in (*QUESTION_TYPES, "overall")) + " |"
    assert row in (REPO / "README.md").read_text(), f"README lacks the recorded row {row}"


def test_record_results_writes_json_and_card_once(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(CHECKPOINT, folder)
    scores = {"color": 0.5, "left_shape": 0.25, "right_shape": 1.0, "word": 0.75, "describe": 0.125,
              "overall": 0.525, "n": 8}
    for _ in range(2):  # a second run replaces the line, it does not add one
        record_results(folder, scores, seed=7)
    text = (folder / "README.md").read_text()
    assert text.count("Held-out shapes-and-words exact match") == 1
    assert "0.525 overall" in text and "0.998" not in text and "8 images of seed 7" in text
    assert json.loads((folder / "eval_results.json").read_text())["scores"]["describe"] == 0.125
    with pytest.raises(ValueError, match="overall"):
        record_results(folder, {"n": 8}, seed=7)


def test_shipped_generation_config_lists_each_end_token_once():
    eos = json.loads((CHECKPOINT / "generation_config.json").read_text())["eos_token_id"]
    assert len(set(eos)) == len(eos), eos


def test_checkpoint_is_small_safetensors_with_auto_map():
    files = {path.name: path.stat().st_size for path in CHECKPOINT.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert sum(files.values()) <= 20 * 2**20
    auto_map = json.loads((CHECKPOINT / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor"} <= set(auto_map)


def test_pipeline_in_fresh_process_answers_every_example():
    """A process that never imports this package loads the folder with trust_remote_code and answers."""
    code = f"""
import json, sys
from PIL import Image
from transformers import pipeline
pipe = pipeline("image-text-to-text", model={str(CHECKPOINT)!r}, trust_remote_code=True)
assert "florence_vl" not in sys.modules
examples = json.loads(open({str(REPO / "examples" / "examples.json")!r}).read())
messages = [[{{"role": "user", "content": [{{"type": "image", "image": Image.open({str(REPO / "examples")!r} + "/" + e["image"])}},
                                         {{"type": "text", "text": e["question"]}}]}}] for e in examples]
outputs = pipe(text=messages, generate_kwargs={{"max_new_tokens": 32}}, return_full_text=False)
print(json.dumps([o[0]["generated_text"] for o in outputs]))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd="/", env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for example, answer in zip(EXAMPLES, answers):
        assert normalize(answer) == normalize(example["answer"]), (example, answer)


def test_cli_answers_the_readme_question():
    """The README's first command (install + demo) gives the right answer."""
    image, question = re.search(r'florence-vl chat (\S+) "([^"]+)"', (REPO / "README.md").read_text()).groups()
    example = next(e for e in EXAMPLES if f"examples/{e['image']}" == image)
    assert example["question"] == question
    result = subprocess.run(["florence-vl", "chat", str(REPO / image), question],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert normalize(result.stdout) == normalize(example["answer"])


@pytest.mark.parametrize("argv, message", [
    (["chat", "no/such/image.png", "What?"], "does not exist"),
    (["chat", "IMAGE", "What?", "--model", "/tmp"], "not a model folder"),
    (["chat", "IMAGE", "What?", "--model", "no/such/model"], "does not exist"),
    (["chat"], "give an IMAGE and a QUESTION"),
])
def test_cli_errors_are_one_line_with_exit_code_2(argv, message):
    argv = [str(REPO / "examples" / EXAMPLES[0]["image"]) if arg == "IMAGE" else arg for arg in argv]
    result = subprocess.run(["florence-vl", *argv], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_interactive_and_bfloat16():
    image = str(REPO / "examples" / "shapes_3.png")
    script = f"What word is written in the image?\n:image {REPO / 'examples' / 'shapes_1.png'}\nWhat shape is on the left?\n:quit\n"
    result = subprocess.run(["florence-vl", "chat", "--interactive", image, "--dtype", "bfloat16"], input=script,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each input line is asked for with a prompt naming the active image (stdin is a pipe: no echo of the input).
    assert result.stdout.splitlines()[1:] == [
        f"[shapes_3.png] > {EXAMPLES[3]['answer']}",
        f"[shapes_3.png] > image: {REPO / 'examples' / 'shapes_1.png'}",
        f"[shapes_1.png] > {EXAMPLES[1]['answer']}",
        "[shapes_1.png] > ",
    ]


def test_ci_runs_exactly_the_readme_test_command():
    """README's second command (install + run every test) is one line, and `.ci/run` runs that very line."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    command = blocks[1].strip()
    assert "\n" not in command and "tests/run.sh" in command, command
    assert command in (REPO / ".ci" / "run").read_text().splitlines(), command


def test_selenium_is_installed_for_the_tests_not_by_the_demo_extra():
    """`pip install florence-vl[demo]` installs what the demo runs (gradio), not the browser tests' Selenium, which
    comes with the `dev` extra that tests/run.sh installs."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extras = {name: value.split() for name, value in config["options.extras_require"].items()}
    assert not [need for need in extras["demo"] if need.startswith("selenium")], extras
    assert [need for need in extras["dev"] if need.startswith("selenium")], extras
    installed = re.search(r'pip install -q -e "\.\[([\w,]+)\]"', (REPO / "tests" / "run.sh").read_text()).group(1)
    assert {"dev", "demo"} <= set(installed.split(",")), installed
