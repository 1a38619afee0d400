"""Florence-VL: Florence-2 depth and breadth vision features for any causal LLM (arXiv 2412.04424)."""

import importlib

# Imported on first use, so that `import florence_vl` (and the vLLM plugin, `florence_vl.vllm_plugin`) also work
# with the older transformers vLLM pins, where only the config and processor can load.
_LAZY = {
    "FlorenceVLConfig": "configuration_florence_vl",
    "FlorenceVLForConditionalGeneration": "modeling_florence_vl",
    "FlorenceVLModel": "modeling_florence_vl",
    "FlorenceVLPreTrainedModel": "modeling_florence_vl",
    "CHAT_TEMPLATES": "processing_florence_vl",
    "FlorenceVLProcessor": "processing_florence_vl",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
