"""`nanokimi export CHECKPOINT OUT_DIR`: a checkpoint as a Hugging Face folder (hf.py)."""

NAME = "export"


def add_parser(sub):
    p = sub.add_parser(
        NAME,
        help="write a checkpoint as a Hugging Face DeepseekV3ForCausalLM folder",
        description="Export a Kimi checkpoint (folder or run out_dir) to OUT_DIR: config.json "
        "(deepseek_v3), model.safetensors with HF names, tokenizer.json.",
    )
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    return p


def run(args):
    from ..hf import export

    print(f"wrote {export(args.checkpoint, args.out_dir)}")
