"""nanoKimi: the Kimi-K2 architecture (MLA + DeepSeekMoE + MuonClip) at small scale."""

from .model import Kimi, KimiConfig
from .presets import PRESETS

__all__ = ["Kimi", "KimiConfig", "PRESETS"]
