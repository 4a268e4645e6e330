"""read a Hugging Face DeepseekV3 folder into a nanoKimi checkpoint

Import a DeepseekV3ForCausalLM / Kimi-K2 folder (safetensors only) as a nanoKimi checkpoint folder OUT_CKPT (MTP
layers are skipped)."""

NAME = "import"  # the module's name ends in _: `import` is Python's own word


def add_arguments(p):
    p.add_argument("hf_dir")
    p.add_argument("out_ckpt")


def run(args):
    from ..hf import import_folder

    print(f"wrote {import_folder(args.hf_dir, args.out_ckpt)}")
