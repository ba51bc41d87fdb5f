"""Each data format runs through train.main(): a short preference run on a conversational file."""
import json
import math
import os

from train import main


def conversation_pairs(n):
    """n single-digit sums as conversational pairs, in turn with and without "prompt" and with a
    system message; short enough to fit the tiny model's 48-token context."""
    lines = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        question = [{"role": "user", "content": f"{a}+{b}?"}]
        if i % 3 == 2:
            question = [{"role": "system", "content": "Sum."}] + question
        chosen = [{"role": "assistant", "content": str(a + b)}]
        rejected = [{"role": "assistant", "content": str(a + b + 1)}]
        if i % 2:
            lines.append({"prompt": question, "chosen": chosen, "rejected": rejected})
        else:
            lines.append({"chosen": question + chosen, "rejected": question + rejected})
    return lines


def test_preference_run_on_conversational_data(tmp_path, tiny_args, sft_ckpt):
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(obj) + "\n" for obj in conversation_pairs(40)))
    main(tiny_args("conv", "--loss", "dpop", "--init", sft_ckpt, "--data", str(data), "--steps", "3",
                   "--batch-size", "4", "--eval-every", "3"))
    with open(os.path.join(tmp_path, "conv", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "loss" in r]  # one per step (--log-every 1 in tiny_args)
    assert len(train_rows) == 3 and all(math.isfinite(r["loss"]) for r in train_rows)
