"""write a checkpoint as a Hugging Face DeepseekV3ForCausalLM folder

Export a Kimi checkpoint (folder or run out_dir) to OUT_DIR: config.json (deepseek_v3), model.safetensors with HF
names, tokenizer.json."""

NAME = "export"


def add_arguments(p):
    p.add_argument("checkpoint")
    p.add_argument("out_dir")


def run(args):
    from ..hf import export

    print(f"wrote {export(args.checkpoint, args.out_dir)}")
