"""Hugging Face interop: nanoKimi <-> `DeepseekV3ForCausalLM` folders (config.json + safetensors), the format of
Kimi-K2's own checkpoints, and `KimiLinearForCausalLM` folders for the KDA hybrid. Each format is an adapter
(hf_deepseek_v3.py, hf_kimi_linear.py) with one interface: which configs it reads and writes, the config both ways, the
tensor names both ways. This file holds what they share: the folders, their safetensors, tokenizers, import and export.
Needs no `transformers`: the folder format is plain JSON and safetensors.

nanoKimi's parameter names already are HF's (minus the `model.` prefix); the one layout difference is that nanoKimi
stacks routed experts as [E, out, in] tensors while HF checkpoints hold one key per expert (transformers 5 loads
those into fused `gate_up_proj` tensors; both layouts are read here). RoPE rotates interleaved pairs, which is
`rope_interleave: true`."""

import json
import warnings
from pathlib import Path

import safetensors.torch
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from . import checkpoint, hf_deepseek_v3, hf_kimi_linear
from .errors import UserError, check_fields, write_failure
from .output_folders import check_apart, check_destination, read_config
from .model import Kimi
from .models import build_model
from .chat_template import IM_END, jinja_template
from .tokenizer import TOKENIZER_FILES, CharTokenizer, HFTokenizer, copy_tokenizer, load_tokenizer

FORMATS = (hf_kimi_linear, hf_deepseek_v3)  # one adapter per format, the same interface; asked in this order


def is_hf_folder(path):
    return "architectures" in (read_config(path) or {})


def format_of(config):
    """The Hugging Face format a model exports as: Kimi Linear for a KDA hybrid (or unrotated MLA), else DeepseekV3."""
    return next(f for f in FORMATS if f.writes(config))


# what every config.json nanoKimi writes ends with: float32 weights, no special token ids (a char vocabulary has
# none), a KV cache for generation
WRITTEN_BY_NANOKIMI = {
    "torch_dtype": "float32",
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "use_cache": True,
}


def to_hf_config(config):
    return format_of(config).to_hf_config(config) | WRITTEN_BY_NANOKIMI


def from_hf_config(hf):
    """A KimiConfig from a config.json dict, by the format it names; refusing what nanoKimi cannot represent."""
    for f in FORMATS:
        if f.reads(hf):
            return f.from_hf_config(hf)
    raise UserError(
        f"config.json describes {hf.get('architectures') or hf.get('model_type')}, not "
        f"DeepseekV3ForCausalLM or KimiLinearForCausalLM: nanoKimi imports only those"
    )


def to_hf_state_dict(model):
    """nanoKimi state dict -> the checkpoint names of the model's format (one key per expert)."""
    state = {key if key.startswith("lm_head") else f"model.{key}": t for key, t in model.state_dict().items()}
    out = format_of(model.config).to_hf_names(state, model.config)
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


def layer_weight_name(parts):
    """Whether "layers.N.REST" split at its dots names a layer's weight as DeepseekV3 spells it: N a number, and an
    expert either fused (mlp.experts.gate_up_proj / down_proj) or one of them (mlp.experts.E.PROJ.weight)."""
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    if parts[2:4] != ["mlp", "experts"]:
        return True
    return len(parts) in (5, 6) and parts[4] in ("gate_up_proj", "down_proj") or len(parts) == 7 and parts[4].isdigit()


def from_hf_state_dict(tensors, config, folder="the folder"):
    """HF tensors (per-expert or fused experts) -> nanoKimi state dict. MTP layers are skipped with a warning."""
    tensors = format_of(config).from_hf_names(tensors)  # DeepseekV3's names, which the rest of this function reads
    state, experts = {}, {}
    skipped = set()
    for name, tensor in tensors.items():
        key = name.removeprefix("model.")
        parts = key.split(".")
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved and every loader recomputes
        if parts[0] == "layers" and not layer_weight_name(parts):
            raise UserError(
                f"tensor {name!r} in {folder} is not a DeepseekV3 weight name (model.layers.N.... with "
                f"experts as mlp.experts.E.PROJ.weight): the safetensors do not match config.json"
            )
        if parts[0] == "layers" and int(parts[1]) >= config.num_hidden_layers:
            skipped.add(int(parts[1]))  # multi-token-prediction modules (num_nextn_predict_layers)
            continue
        if ".mlp.experts." in key:
            layer = int(parts[1])
            if parts[4] == "gate_up_proj":  # transformers 5 fused layout [E, 2I, H]
                gate, up = tensor.chunk(2, dim=1)
                state[f"layers.{layer}.mlp.experts.gate_proj"] = gate
                state[f"layers.{layer}.mlp.experts.up_proj"] = up
            elif parts[4] == "down_proj":  # fused [E, H, I]
                state[f"layers.{layer}.mlp.experts.down_proj"] = tensor
            else:  # layers.N.mlp.experts.E.PROJ.weight
                experts.setdefault((layer, parts[5]), {})[int(parts[4])] = tensor
        else:
            state[key] = tensor
    for (layer, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(config.n_routed_experts)):
            raise UserError(
                f"layer {layer} holds experts {sorted(per_expert)[:5]}..., expected "
                f"{config.n_routed_experts}: the weights do not match config.json"
            )
        shapes = {tuple(t.shape) for t in per_expert.values()}
        if len(shapes) > 1:
            raise UserError(
                f"layer {layer}'s experts' {proj} come in shapes {sorted(shapes)[:3]}: every expert of a "
                f"layer has one shape; the safetensors in {folder} are damaged"
            )
        state[f"layers.{layer}.mlp.experts.{proj}"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    if skipped:
        warnings.warn(f"skipped multi-token-prediction layer(s) {sorted(skipped)}: nanoKimi does not use MTP")
    if config.tie_word_embeddings:
        if "embed_tokens.weight" not in state:
            raise UserError(f"config.json ties the embeddings but {folder} holds no model.embed_tokens.weight")
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    return state


def read_safetensors(folder):
    """Every tensor of a folder's safetensors. A sharded folder is read through its model.safetensors.index.json:
    only the shards it names, each holding the tensors it maps there (another .safetensors beside them, a stale
    export, is ignored with a warning); without an index, no tensor may be in two files."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_index(index)
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"{index} names shard(s) {', '.join(missing[:3])} that {folder} does not hold: copy "
                f"the missing file(s) in (a download cut short?)"
            )
        ignored = sorted(set(p.name for p in folder.glob("*.safetensors")) - {f.name for f in files})
        if ignored:
            warnings.warn(
                f"{folder}: ignored {', '.join(ignored[:3])}, which {index.name} does not name (the "
                f"shards it names are the model)"
            )
    else:
        files, weight_map = sorted(folder.glob("*.safetensors")), None
    if not files:
        raise UserError(f"no .safetensors files in {folder}: nanoKimi reads only safetensors (never pickles)")
    tensors, where = {}, {}
    for f in files:
        try:
            shard = safetensors.torch.load_file(f)
        except (safetensors.SafetensorError, OSError) as e:
            raise UserError(f"{f} is corrupt or truncated ({e})") from None
        twice = sorted(shard.keys() & tensors.keys())
        if twice:
            raise UserError(
                f"{f.name} and {where[twice[0]]} in {folder} both hold {twice[0]!r}: remove the stale "
                f"file, or name the shards in model.safetensors.index.json"
            )
        tensors |= shard
        where |= dict.fromkeys(shard, f.name)
    if weight_map is not None:
        absent = sorted(name for name, file in weight_map.items() if where.get(name) != file)
        if absent:
            raise UserError(
                f"{weight_map[absent[0]]} does not hold {absent[0]!r}, which {index.name} maps there"
                f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}: the shard is damaged "
                f"or from another export"
            )
    return tensors


def read_index(path):
    try:
        index = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}): restore it or export the folder again") from None
    check_fields(index, path, {"weight_map": dict}, fix="restore it or export the folder again")
    if not all(
        isinstance(v, str) and v.endswith(".safetensors") and "/" not in v for v in index["weight_map"].values()
    ):
        raise UserError(f'{path}: "weight_map" must map tensor names to .safetensors files of this folder')
    return index["weight_map"]


def load_hf(folder):
    """A Kimi model from a DeepseekV3 folder."""
    try:
        hf_config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {Path(folder) / 'config.json'} ({e})") from None
    except RecursionError:
        raise UserError(f"{Path(folder) / 'config.json'} is nested too deeply to be a model config") from None
    check_fields(
        hf_config,
        Path(folder) / "config.json",
        {
            "hidden_size": int,
            "num_hidden_layers": int,
            "num_attention_heads": int,
            "vocab_size": int,
            "rope_scaling?": (dict, type(None)),
            "rope_parameters?": (dict, type(None)),
        },
        fix="a DeepseekV3 config.json names it so",
    )
    config = from_hf_config(hf_config)
    model = build_model("kimi", config)
    state = from_hf_state_dict(read_safetensors(folder), config, folder)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(
            f"the weights in {folder} are not finite (e.g. {bad}): the folder's safetensors are damaged "
            f"or come from a diverged run"
        )
    checkpoint.load_matching(model, {k: v.float() for k, v in state.items()}, f"Hugging Face folder {folder}")
    return model


def char_tokenizer_json(tokenizer):
    """A char-level vocabulary as an HF `tokenizers` file: one token per character, decoded by concatenation; its
    document boundary and chat tokens (if any) special tokens."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(tokenizer.specials))
    return tok


def save_hf(model, out_dir, tokenizer_dir=None):
    """Write an HF DeepseekV3ForCausalLM folder: config.json, model.safetensors, and the tokenizer if given
    (tokenizer.json for BPE or char vocabularies, plus nanoKimi's meta.json so `import` gets it back exactly)."""
    try:
        return write_hf_folder(model, Path(out_dir), tokenizer_dir)
    except (OSError, safetensors.SafetensorError) as e:
        raise UserError(
            f"could not write {out_dir} ({write_failure(e)}): free some space or pick a writable folder"
        ) from None


def write_hf_folder(model, out_dir, tokenizer_dir):
    """`save_hf`'s writes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = to_hf_config(model.config)
    checkpoint.save_tensors(to_hf_state_dict(model), out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    chat = tokenizer is not None and tokenizer.special_token_id(IM_END) is not None
    # a chat model's reply ends at <|im_end|>, as Kimi-K2's generation_config.json says
    generation = {"do_sample": False} | ({"eos_token_id": tokenizer.special_token_id(IM_END)} if chat else {})
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
        if isinstance(tokenizer, CharTokenizer):
            char_tokenizer_json(tokenizer).save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(
            json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
                | ({"eos_token": IM_END} if chat else {}),
                indent=2,
            )
            + "\n"
        )
        if chat:  # transformers' apply_chat_template reads it: the same ids as nanoKimi's renderer
            (out_dir / "chat_template.jinja").write_text(jinja_template())
    return out_dir


EXPORT_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    *TOKENIZER_FILES,
}


def export(checkpoint_path, out_dir):
    """`nanokimi export`: a trained nanoKimi checkpoint -> an HF folder with its tokenizer. OUT_DIR is new, empty
    or an earlier export (holding only the files export writes)."""
    ckpt_path = checkpoint.resolve(checkpoint_path)
    check_apart(ckpt_path.parent if ckpt_path.name == checkpoint.NAME else ckpt_path, out_dir, "export")
    check_destination(out_dir, "export", "a Hugging Face model folder", EXPORT_FILES)
    model, tokenizer, ckpt = checkpoint.load_model(ckpt_path)
    if not isinstance(model, Kimi):
        raise UserError(
            f"{ckpt.path} holds the {ckpt.arch} baseline: only Kimi models export (to DeepseekV3 or Kimi Linear)"
        )
    if tokenizer is None:  # an imported checkpoint may have none: an earlier export's must not stay beside it
        for name in (*TOKENIZER_FILES, "tokenizer_config.json", "chat_template.jinja"):
            (Path(out_dir) / name).unlink(missing_ok=True)
    return save_hf(model, out_dir, ckpt.path if tokenizer is not None else None)


def import_folder(hf_dir, out):
    """`nanokimi import`: an HF DeepseekV3 folder -> a nanoKimi checkpoint folder (tokenizer included if any)."""
    hf_dir, out = Path(hf_dir), Path(out).resolve()
    if not is_hf_folder(hf_dir):
        raise UserError(f"{hf_dir} is not a Hugging Face model folder (no config.json with 'architectures')")
    check_apart(hf_dir, out, "import")
    check_destination(out, "import", "a nanoKimi checkpoint", checkpoint.FILES)
    if (read_config(out) or {}).get("train"):  # a checkpoint a training run wrote: its optimizer state would go
        raise UserError(
            f"{out} holds a training run's checkpoint: `nanokimi import` does not replace it, pick a new folder"
        )
    model = load_hf(hf_dir)
    path = checkpoint.save(
        out.parent,
        model,
        "kimi",
        model.config,
        name=out.name,
        tokenizer_dir=hf_dir if (hf_dir / "meta.json").is_file() else None,
    )
    if not (path / "meta.json").is_file() and (hf_dir / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a corrupt file
            raise UserError(
                f"cannot read {hf_dir / 'tokenizer.json'} ({str(e)[:100]}): the weights were imported "
                f"into {path}; give it a tokenizer with `nanokimi prepare --tokenizer_from`"
            ) from None
        HFTokenizer(tokenizer).save(path)
    return path


def from_pretrained(path):
    """A model in eval mode from a nanoKimi checkpoint (folder or run out_dir) or a Hugging Face DeepseekV3 folder."""
    if is_hf_folder(path):
        return load_hf(path).eval()
    return checkpoint.load_model(path)[0]


def save_pretrained(model, path, format="nanokimi"):
    """Write `model` as a nanoKimi checkpoint folder (format="nanokimi") or a DeepseekV3ForCausalLM folder ("hf")."""
    if format == "hf":
        return save_hf(model, path)
    if format != "nanokimi":
        raise ValueError(f"unknown format {format!r}: use 'nanokimi' or 'hf'")
    path = Path(path).resolve()
    arch = next(name for name, (_, cls) in checkpoint.ARCHS.items() if isinstance(model, cls))
    return checkpoint.save(path.parent, model, arch, model.config, name=path.name)
