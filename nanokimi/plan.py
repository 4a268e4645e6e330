"""What a run trains on, decided before anything is built: its data, the model's arch and config, and the checkpoint
it resumes or finetunes from, with the checks that keep them consistent (tokenizer, context, settings that cannot
change)."""

from dataclasses import dataclass

from . import checkpoint
from .batches import TokenData, open_data
from .errors import UserError
from .models import find_preset, make_config
from .tokenizer import appended_tokens, check_same_tokenizer


@dataclass
class RunPlan:
    """What a run trains on: its data, the model's arch ("kimi" or "gpt") and config, and the checkpoint it starts
    from (or None)."""

    data: TokenData
    arch: str
    config: object
    source: checkpoint.Checkpoint | None
    added_tokens: tuple = ()  # tokens the data's tokenizer appends to the finetuned model's (its rows are grown)


def plan_run(cfg, overrides):
    """The data and model for TrainConfig `cfg` with model-field `overrides`: the model from the preset (its vocab
    from the data), or from the checkpoint it resumes or finetunes (whose tokenizer must be the data's)."""
    if not (cfg.resume or cfg.overwrite) and checkpoint.find(cfg.out_dir) is not None:
        raise UserError(
            f"{cfg.out_dir} already holds a checkpoint: --resume continues it, --overwrite replaces it, "
            f"or pick another --out_dir"
        )
    source = (
        checkpoint.Checkpoint(cfg.out_dir if cfg.resume else cfg.init_from) if (cfg.resume or cfg.init_from) else None
    )
    arch, base = find_preset(cfg.preset) if source is None else (source.arch, source.model_config)
    if cfg.init_from and find_preset(cfg.preset)[0] != arch:
        names = {"kimi": "nanoKimi", "gpt": "nanoGPT baseline"}
        raise UserError(
            f"--init_from={cfg.init_from} is a {names[arch]} checkpoint but {cfg.preset} trains a "
            f"{names[find_preset(cfg.preset)[0]]} model: finetune it with a run or preset of its kind "
            f"(e.g. {'gpt-shakespeare-char-cpu' if arch == 'gpt' else 'finetune-shakespeare-char'})"
        )
    data = open_data(cfg.data, cfg.block_size)
    if source is None:
        config = make_config(arch, base, overrides | {"vocab_size": data.tokenizer.vocab_size})
    else:
        allowed = {"dropout"} if cfg.init_from else set()  # a finetune may change regularisation, nothing else
        changed = sorted(k for k, v in overrides.items() if k not in allowed and base.get(k) != v)
        if changed:
            raise UserError(f"model settings {changed} cannot change when continuing from a checkpoint: drop them")
        added = appended_tokens(source.path, data.folder) if cfg.init_from else None
        if added:  # a base model finetuned on chat data: its vocabulary grows by the chat tokens
            base = base | {"vocab_size": data.tokenizer.vocab_size}
        else:
            check_same_tokenizer(source.path, data.folder)
        config = make_config(arch, base, overrides, source.path / "config.json")
    if cfg.block_size > config.context_length:
        raise UserError(
            f"block_size ({cfg.block_size}) exceeds the model's context ({config.context_length}): lower "
            f"--block_size or raise --{config.context_field}"
        )
    return RunPlan(data, arch, config, source, tuple(added or ()) if source is not None else ())
