"""experiment.py: the quick mode end to end, and the token-level measurement it reports."""
import json
import os

import pytest
import torch

import experiment
import train
from data import answer_of, load_tokenizer, tokenize_pairs
from model import GPT, GPTConfig


@pytest.mark.slow
def test_quick_mode_runs_the_whole_grid_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "exp")
    experiment.main(["--quick", "--out", out])
    report = open(os.path.join(out, "results.md")).read()
    for data, methods in experiment.METHODS.items():
        for method in methods:
            assert f"| {data} | {experiment.NAMES[method]} |" in report
    for lam in ("0", "5", "50", "500"):
        assert f"\n| {lam} | " in report
    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results) == 4 + 4 + 4 + 2  # arith, arith-hed, self, the two extra lam values
    assert all(set(r["tokens"]) == {"before", "at", "after"} for r in results if r["data"] == "arith")
    # the self variant: each rejected is one of the reference's samples with a wrong final answer
    pairs = [json.loads(line) for line in open(os.path.join(out, "seed1", "self-train.jsonl"))]
    assert pairs
    for p in pairs:
        a, b = map(int, p["prompt"].rstrip("=").split("+"))
        assert answer_of(p["chosen"]) == a + b and answer_of(p["rejected"]) != a + b
    # a second call finds every run finished and trains nothing
    capsys.readouterr()
    experiment.main(["--quick", "--out", out])
    assert f"{out}/seed1" not in capsys.readouterr().out.split("Seeds 1")[0]


def test_token_view_is_zero_for_the_reference_and_sums_to_the_sequence_change():
    torch.manual_seed(0)
    enc = load_tokenizer("byte")
    records = [{"prompt": "12+34=", "chosen": "4+2=6; 3+1=4; answer 46", "rejected": "4+2=6; 3+1=5; answer 46"},
               {"prompt": "5+5=", "chosen": "answer 10", "rejected": "answer 11"}]
    pairs = tokenize_pairs(records, enc, 64)[0]
    reference = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)).eval()
    ref = experiment.measure(reference, pairs, enc)
    assert experiment.token_view(ref, ref, pairs) == {"before": 0, "at": 0, "after": 0}
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)).eval()
    per_token = experiment.chosen_token_logps(policy, pairs, enc)
    chosen, _ = train.all_pair_logps(policy, pairs, enc, experiment.nullcontext(), experiment.CPU)
    torch.testing.assert_close(torch.stack([t.sum() for t in per_token]), chosen)
    # the first difference is completion token 11 of pair 0 ("4" vs "5") and token 8 of pair 1 ("0" vs "1")
    assert [len(t) for t in per_token] == [len(pairs[0][1]), len(pairs[1][1])]
    view = experiment.token_view(experiment.measure(policy, pairs, enc), ref, pairs)
    deltas = [(p - r).tolist() for p, r in zip(per_token, experiment.chosen_token_logps(reference, pairs, enc))]
    before = deltas[0][:11] + deltas[1][:8]
    assert abs(view["before"] - sum(before) / len(before)) < 1e-6
    assert abs(view["at"] - (deltas[0][11] + deltas[1][8]) / 2) < 1e-6
