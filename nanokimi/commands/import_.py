"""`nanokimi import HF_DIR OUT_CKPT`: a Hugging Face folder as a nanoKimi checkpoint (hf.py). The module's name ends
in _ because `import` is Python's own word."""

NAME = "import"


def add_parser(sub):
    p = sub.add_parser(
        NAME,
        help="read a Hugging Face DeepseekV3 folder into a nanoKimi checkpoint",
        description="Import a DeepseekV3ForCausalLM / Kimi-K2 folder (safetensors only) as a nanoKimi "
        "checkpoint folder OUT_CKPT (MTP layers are skipped).",
    )
    p.add_argument("hf_dir")
    p.add_argument("out_ckpt")
    return p


def run(args):
    from ..hf import import_folder

    print(f"wrote {import_folder(args.hf_dir, args.out_ckpt)}")
