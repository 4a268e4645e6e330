"""nanoKimi: the Kimi-K2 architecture (MLA + DeepSeekMoE + MuonClip) at small scale."""

from .hf import from_pretrained, save_pretrained
from .model import Kimi, KimiConfig
from .presets import PRESETS

__all__ = ["Kimi", "KimiConfig", "PRESETS", "from_pretrained", "save_pretrained"]
