"""Florence-VL: Florence-2 depth and breadth vision features for any causal LLM (arXiv 2412.04424)."""

from .configuration_florence_vl import FlorenceVLConfig
from .modeling_florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLModel, FlorenceVLPreTrainedModel
from .processing_florence_vl import CHAT_TEMPLATES, FlorenceVLProcessor

__all__ = [
    "CHAT_TEMPLATES",
    "FlorenceVLProcessor",
    "FlorenceVLConfig", "FlorenceVLForConditionalGeneration", "FlorenceVLModel", "FlorenceVLPreTrainedModel"]
