"""Complete prompts with one or more checkpoints, side by side (nanoGPT has a sample.py too).

    python sample.py out/sft-arith-seed1337/ckpt.pt out/dpo-arith-seed1337/ckpt.pt out/dpop-arith-seed1337/ckpt.pt
    python sample.py out/dpop-arith-seed1337/ckpt.pt --problems 20            # more test problems
    python sample.py out/dpop-arith-seed1337/ckpt.pt --prompt "123+456=" --prompt "7+8="   # your own
    python sample.py out/dpo-arith-seed1337/ckpt.pt --temperature 1 --top-k 5 --seed 2     # sampled

Without --prompt, every checkpoint completes the first --problems held-out test problems of the
built-in data (those whose accuracy the demo's summary reports; no run trains on them). Each
completion is marked right or wrong by its final answer, and each model's accuracy on these
problems follows. Decoding is greedy by default, as in the summary; with a --temperature above 0
each model samples with its own generator seeded with --seed, so a command repeats exactly. Each
checkpoint is read with the tokenizer named in its config. Everything runs on the CPU.
"""
import argparse
import os
import sys
from contextlib import nullcontext

import torch

from data import DataError, answer_of, builtin_data, load_tokenizer
from extras import checkpoints, config, report
from extras.generation import complete


def parse_args(argv=None):
    p = config.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="ckpt.pt files written by train.py")
    p.add_argument("--problems", type=int, default=5, help="how many held-out test problems (1 to 200)")
    p.add_argument("--prompt", action="append", default=[],
                   help="complete this prompt instead of the test problems (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample at it")
    p.add_argument("--top-k", type=int, default=None, help="when sampling, only from the k likeliest tokens")
    p.add_argument("--seed", type=int, default=1337, help="the seed of each model's sampling generator")
    p.add_argument("--max-new-tokens", type=int, default=48, help="the longest completion, in tokens")
    args = p.parse_args(argv)
    try:  # every flag in its range, or one error line that names it
        config.check_ranges(vars(args), {"temperature": "zero or positive", "top_k": "positive",
                                         "max_new_tokens": "positive", "seed": "zero or positive"})
    except DataError as e:
        p.error(str(e))
    return args


def names_of(paths):
    """A short name for each checkpoint, its folder's (out/dpo-arith-seed1337/ckpt.pt gives
    dpo-arith-seed1337); the paths themselves when two folders have the same name."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in paths]
    return names if len(set(names)) == len(names) else list(paths)


def completions(path, prompts, args):
    """The completions of prompts by the checkpoint at path, greedy or sampled as args say."""
    model, ckpt = checkpoints.model_from_checkpoint(path)  # a DataError with one line if it is not one
    enc = load_tokenizer(ckpt["config"]["tokenizer"])  # the tokenizer it was trained with
    sampling = {}
    if args.temperature > 0:
        sampling = dict(temperature=args.temperature, top_k=args.top_k,
                        generator=torch.Generator().manual_seed(args.seed))
    # batched decoding: prompts of equal length are completed together
    return complete(model, enc, prompts, nullcontext(), torch.device("cpu"),
                             max_new_tokens=args.max_new_tokens, **sampling)


def main(argv=None):
    args = parse_args(argv)
    try:
        test = builtin_data("arith")["test"]  # (prompt, answer) pairs
        if not args.prompt and not 1 <= args.problems <= len(test):
            raise DataError(f"--problems must be between 1 and {len(test)}, got {args.problems}")
        problems = [(prompt, None) for prompt in args.prompt] or test[:args.problems]
        prompts = [prompt for prompt, _ in problems]
        texts = {name: completions(path, prompts, args)
                 for name, path in zip(names_of(args.checkpoints), args.checkpoints)}
    except DataError as e:
        sys.exit(f"error: {e}")

    what = "your prompts" if args.prompt else f"the first {len(problems)} test problems of the built-in data"
    how = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature:g}" + (
        f", top-k {args.top_k}" if args.top_k else "") + f", seed {args.seed}"
    report.print_examples(problems, texts, f"{what}, {how}")
    if not args.prompt:
        width = max(map(len, texts))
        print(f"--- accuracy on these {len(problems)} problems")
        for name, model_texts in texts.items():
            right = sum(answer_of(text) == answer for text, (_, answer) in zip(model_texts, problems))
            print(f"  {name:{width}}  {right}/{len(problems)} ({right / len(problems):.0%})")


if __name__ == "__main__":
    main()
