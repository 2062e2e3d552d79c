"""minivlmamba: a compact, readable VL-Mamba (a vision-language model whose LM is Mamba)."""

from minivlmamba.config import PRESETS, UserError, VLMConfig, preset
from minivlmamba.mamba import MambaConfig, MambaLM
from minivlmamba.vision import VisionConfig, VisionTower
from minivlmamba.vlm import VLMamba

__all__ = ["MambaConfig", "MambaLM", "PRESETS", "UserError", "VLMConfig", "VLMamba", "VisionConfig",
           "VisionTower", "preset"]
