"""docs/homework.md, task 3: APO-zero through the loss registry, graded. On a student copy these
tests grade the student's `apo_zero` in dpop.LOSSES (and fail, saying what to add, until there is
one); in the repo, where the teacher's answer key (extras/homework_key.py) is present, they grade
the key, so the grader is itself tested."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_MODEL

import dpop
from dpop import LOSSES, preference_loss

NAME = "apo_zero"
# what a subprocess runs: the student's entry, or the key's when the repo has it and dpop lacks one
REGISTER = ("import dpop\nif 'apo_zero' not in dpop.LOSSES:\n    try:\n        from extras import homework_key\n"
            "        homework_key.register(dpop.LOSSES)\n    except ImportError:\n        pass\n")


@pytest.fixture
def apo(monkeypatch):
    """The entry under test: the student's, else the key's (registered for this test only)."""
    if NAME not in LOSSES:
        try:
            from extras import homework_key
        except ImportError:
            pytest.fail(f"no '{NAME}' in dpop.LOSSES yet: add its function and entry (docs/homework.md, task 3)")
        monkeypatch.setitem(LOSSES, NAME, homework_key.ENTRY)
    return LOSSES[NAME]


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def test_apo_zero_is_registered_with_a_reference_and_beta(apo):
    assert apo.reference and apo.knobs == {"beta": 0.1} and not apo.lengths


def test_apo_zero_closed_form_and_rewards(apo):
    """1 - sigmoid(beta c) + sigmoid(beta r) at three pairs; the rewards are beta c and beta r,
    detached; at the reference (c = r = 0) the loss is 1."""
    pc, pr = torch.tensor([-10.0, -12.0, -8.0]), torch.tensor([-10.0, -15.0, -13.0])
    rc, rr = torch.tensor([-10.0, -10.0, -10.0]), torch.tensor([-10.0, -10.0, -10.0])
    beta = 0.3
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, loss=NAME, beta=beta)
    expected = [1 - sigmoid(beta * c) + sigmoid(beta * r) for c, r in ((0, 0), (-2, -5), (2, -3))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    assert losses[0].item() == pytest.approx(1.0)
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))
    assert not chosen_rewards.requires_grad


def test_apo_zero_pulls_the_chosen_up_wherever_it_is(apo):
    """dL/dc = -beta sigmoid'(beta c): -beta/4 at the reference, negative for every c (the
    anchor DPO lacks); dL/dr = +beta sigmoid'(beta r), whatever c is."""
    beta = 0.1
    c = torch.tensor([0.0, -20.0, -2.0, 3.0], requires_grad=True)
    r = torch.tensor([0.0, -25.0, -5.0, -1.0], requires_grad=True)
    zero = torch.zeros(4)
    losses, _, _ = preference_loss(c, r, zero, zero, loss=NAME, beta=beta)
    losses.sum().backward()
    slope = lambda v: sigmoid(v) * (1 - sigmoid(v))  # the sigmoid's derivative
    torch.testing.assert_close(c.grad, torch.tensor([-beta * slope(beta * v) for v in c.tolist()]))
    torch.testing.assert_close(r.grad, torch.tensor([beta * slope(beta * v) for v in r.tolist()]))
    assert c.grad[0].item() == pytest.approx(-beta / 4) and (c.grad < 0).all()


@pytest.mark.slow  # train.py in a subprocess
def test_train_py_runs_apo_zero_end_to_end(tmp_path, sft_ckpt, small_pairs):
    """--loss apo_zero trains from a checkpoint through train.py's own flags (the registry makes
    the flag) and writes its summary; --beta reaches the loss."""
    args = ["--loss", NAME, "--init", sft_ckpt, "--data", small_pairs, "--steps", "3", "--batch-size", "4",
            "--beta", "0.2", "--log-every", "1", "--eval-every", "3", "--out", str(tmp_path / "apo"), *TINY_MODEL]
    code = REGISTER + "import sys, train\ntrain.main(sys.argv[1:])\n"
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"training: loss {NAME}, beta 0.2;" in done.stdout
    first = json.loads(open(tmp_path / "apo" / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(1.0, abs=1e-6)  # the policy starts as the reference
    assert os.path.exists(tmp_path / "apo" / "summary.json")
