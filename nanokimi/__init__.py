"""nanoKimi: the Kimi-K2 architecture (MLA + DeepSeekMoE + MuonClip) at small scale."""

__all__ = ["Kimi", "KimiConfig", "PRESETS", "encode_chat", "from_pretrained", "save_pretrained"]


def __getattr__(name):
    """The public names, imported on first use: `nanokimi.cli` starts without torch, so that `nanokimi --help` is
    instant and a Ctrl-C while torch loads reaches the CLI's one-line handler instead of a traceback."""
    if name in ("from_pretrained", "save_pretrained"):
        from . import hf

        return getattr(hf, name)
    if name in ("Kimi", "KimiConfig"):
        from . import model

        return getattr(model, name)
    if name == "encode_chat":
        from .chat import encode_chat

        return encode_chat
    if name == "PRESETS":
        from .models import PRESETS

        return PRESETS
    raise AttributeError(f"module 'nanokimi' has no attribute {name!r}")
