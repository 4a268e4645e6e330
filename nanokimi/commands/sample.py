"""generate text from a checkpoint

Stream samples from a checkpoint (a run's out_dir or its checkpoint folder)."""

from . import add_checkpoint_arguments

NAME = "sample"


def add_arguments(p):
    add_checkpoint_arguments(p)
    p.add_argument("--prompt", help="text to continue (default: a newline)")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token (no MLA cache)")


def run(args):
    from ..sample import sample

    sample(
        args.checkpoint,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.num_samples,
        not args.no_cache,
        args.device,
    )
