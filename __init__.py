"""Florence-VL: Florence-2 depth and breadth vision features for any causal LLM (arXiv 2412.04424)."""

from .configuration_florence_vl import FlorenceVLConfig
from .modeling_florence_vl import FlorenceVLForConditionalGeneration, FlorenceVLModel, FlorenceVLPreTrainedModel

__all__ = ["FlorenceVLConfig", "FlorenceVLForConditionalGeneration", "FlorenceVLModel", "FlorenceVLPreTrainedModel"]
