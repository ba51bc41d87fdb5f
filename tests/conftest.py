"""Shared test set-up: import the top-level modules, and a tiny model configuration for runs of
train.main() that take a second or two on a CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GPT2_RANKS = os.path.join(ROOT, "..", "shared", "data", "gpt2.tiktoken")

TINY_MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48"]


@pytest.fixture
def tiny_args(tmp_path):
    """Flags for a fast run on the built-in data, writing into a temporary folder."""
    def make(out_name, *extra):
        return [*TINY_MODEL, "--out", str(tmp_path / out_name), "--sft-target-acc", "0",
                "--log-every", "1", *extra]
    return make
