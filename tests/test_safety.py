"""Safe loading: the Hub code files import only stdlib/torch/transformers, no pickle, no network on load."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_config, tiny_processor

from florence_vl import FlorenceVLForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
CODE_FILES = ["configuration_florence_vl.py", "modeling_florence_vl.py", "processing_florence_vl.py"]
# numpy is a hard dependency of transformers; PIL is imported only under `is_vision_available()`.
ALLOWED_TOP_LEVEL = {"torch", "transformers", "numpy", "huggingface_hub"}


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level outside `if` guards (relative imports excluded)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", CODE_FILES)
def test_code_files_import_only_stdlib_torch_transformers(name):
    unexpected = {module for module in top_level_imports(REPO / name)
                  if module not in ALLOWED_TOP_LEVEL and module not in sys.stdlib_module_names}
    assert not unexpected, f"{name} imports {unexpected} at top level; guard optional imports"


def package_python_files() -> list[Path]:
    """The project's own tracked `.py` files outside tests/: never a virtual environment or build folder inside the
    clone, whatever its name (`venv/`, `env/`, `.venv1/` hold third-party files, some of which do not even parse)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split("\0")
    return [REPO / name for name in listed if name and not name.startswith("tests/")]


def test_safety_checks_read_exactly_the_tracked_package_files():
    files = package_python_files()
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    names = {str(path.relative_to(REPO)) for path in files}
    assert {"modeling_florence_vl.py", "train/sft.py", "demo.py"} <= names
    assert names <= tracked, sorted(names - tracked)[:5]


def test_no_pickle_loading_anywhere_in_the_package():
    offenders = []
    for path in package_python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                if any(module and module.split(".")[0] in ("pickle", "dill", "cloudpickle") for module in modules):
                    offenders.append(f"{path}: imports pickle")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert not offenders, offenders


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    config = tiny_config()
    FlorenceVLForConditionalGeneration(config).save_pretrained(folder)
    tiny_processor(config).save_pretrained(folder)
    return folder


def test_loading_opens_no_network_connection(saved):
    code = f"""
import socket
def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from transformers import AutoModelForImageTextToText, AutoProcessor
AutoModelForImageTextToText.from_pretrained({str(saved)!r}, trust_remote_code=True)
AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_loading_without_trust_remote_code_refuses(saved):
    code = (f"from transformers import AutoModelForImageTextToText; "
            f"AutoModelForImageTextToText.from_pretrained({str(saved)!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "trust_remote_code" in result.stderr


def test_checkpoint_weights_are_safetensors_only(saved):
    assert (saved / "model.safetensors").exists()
    assert not list(saved.glob("*.bin")) and not list(saved.glob("*.pt"))
