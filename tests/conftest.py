"""Shared test set-up: import the top-level modules, and a tiny model configuration for runs of
train.main() that take a second or two on a CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GPT2_RANKS = os.path.join(ROOT, "..", "shared", "data", "gpt2.tiktoken")

TINY_MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48"]


def forward_backward(model, ref, batches, cfg, ref_logps=None):
    """One optimizer step's forward and backward as train.py's loop does it (CPU, float32): each
    micro-batch's loss divided by their number, so the gradients add up to the mean's; returns
    the metrics' mean over micro-batches. ref_logps: None, or precomputed ones per micro-batch."""
    from train import batch_loss
    stats = {}
    for i, batch in enumerate(batches):
        loss, micro = batch_loss(model, ref, batch, cfg, None if ref_logps is None else ref_logps[i])
        (loss / len(batches)).backward()
        for k, v in micro.items():
            stats[k] = stats.get(k, 0.0) + v / len(batches)
    return stats


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: subprocess, torchrun and experiment runs; "
                            "python -m pytest -m 'not slow' is the fast lesson subset")


@pytest.fixture
def tiny_args(tmp_path):
    """Flags for a fast run on the built-in data, writing into a temporary folder."""
    def make(out_name, *extra):
        return [*TINY_MODEL, "--out", str(tmp_path / out_name), "--sft-target-acc", "0",
                "--log-every", "1", *extra]
    return make


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory):
    """A tiny SFT model trained for a second or two: the reference for preference runs."""
    from train import main
    out = tmp_path_factory.mktemp("sft")
    main(["--loss", "sft", "--steps", "60", "--batch-size", "32", "--lr", "3e-3",
          "--eval-every", "60", "--out", str(out), *TINY_MODEL, "--sft-target-acc", "0"])
    return str(out / "ckpt.pt")


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory):
    """64 built-in pairs as a JSONL file: quick to load, and no generation eval (no answers)."""
    import json
    from data import builtin_data
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in builtin_data("arith")["train"][:64]))
    return str(path)
