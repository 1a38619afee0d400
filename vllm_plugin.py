"""vLLM plugin: serve Florence-VL checkpoints with vLLM, unchanged (`vllm serve <florence-vl folder>`).

vLLM finds `register` through the `vllm.general_plugins` entry point of this package and calls it in every
process it starts. It registers the config (so `--trust-remote-code` is not needed) and the model class; the
model itself (`florence_vl.vllm_model`) is imported by vLLM only when it builds the model.

This module and `vllm_model` import only the config and processor, which also run on the older transformers
that vLLM pins (>= 5.16.1); `modeling_florence_vl` (transformers >= 5.24) is never imported here.
"""

ARCHITECTURE = "FlorenceVLForConditionalGeneration"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .configuration_florence_vl import FlorenceVLConfig

    AutoConfig.register(FlorenceVLConfig.model_type, FlorenceVLConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__package__}.vllm_model:FlorenceVLForConditionalGeneration")
