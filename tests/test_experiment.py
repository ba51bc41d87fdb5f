"""experiment.py: the quick mode end to end, and the token-level measurement it reports."""
import json
import math
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
    # each cell of the main table is its own column's figure (one seed: the value itself)
    for r in results:
        if r["lam"] is None:
            cells = [100 * r["accuracy"], r["chosen"], r["rejected"], r["margin"], 100 * r["reward_acc"]]
            row = (f"| {r['data']} | {experiment.NAMES[r['method']]} | {cells[0]:.1f}% | {cells[1]:+.2f} | "
                   f"{cells[2]:+.2f} | {cells[3]:+.2f} | {cells[4]:.1f}% |")
            assert row in report, row
    assert len(results) == 5 + 5 + 5 + 2  # arith, arith-hed, self, the two extra lam values
    assert all(set(r["tokens"]) == {"before", "at", "after"} for r in results if r["data"] == "arith")
    # the self variant: each rejected is one of the reference's samples with a wrong final answer
    pairs = [json.loads(line) for line in open(os.path.join(out, "seed1", "self-train.jsonl"))]
    assert pairs
    for p in pairs:
        a, b = map(int, p["prompt"].rstrip("=").split("+"))
        assert answer_of(p["chosen"]) == a + b and answer_of(p["rejected"]) != a + b
    # DPO's runs carry the three predictors' rank correlations with each pair's chosen change
    dpo = [r for r in results if r["method"] == "dpo"]
    assert len(dpo) == 3 and all(set(r["spearman"]) == {"edit distance", "CHES", "first difference"}
                                 and all(-1 <= v <= 1 for v in r["spearman"].values()) for r in dpo)
    # a second call finds every run finished and trains nothing
    capsys.readouterr()
    experiment.main(["--quick", "--out", out])
    assert f"{out}/seed1" not in capsys.readouterr().out.split("Seeds 1")[0]
    # the learning-rate sweep reuses the grid's reference and its lr 2e-4 runs: 18 new runs
    experiment.main(["--lr-sweep", "--quick", "--out", out])
    trained = capsys.readouterr().out.split("Seeds 1")[0]
    assert trained.count(f"{out}/seed1/") == 18 and "/sft:" not in trained and "/dpo:" not in trained
    sweep = json.load(open(os.path.join(out, "lr-sweep.json")))
    assert {(r["data"], r["method"], r["lr"]) for r in sweep} == {
        (d, m, lr) for d in ("arith", "arith-hed") for m in ("dpo", "dpop", "rpo") for lr in experiment.SWEEP_LRS}
    assert all(set(r["spearman"]) == {"edit distance", "CHES", "first difference"}
               for r in sweep if r["method"] == "dpo")
    grid = {(r["data"], r["method"]): r for r in results}
    for r in sweep:
        if r["lr"] == 2e-4:  # the grid's run: the same summary, read back
            assert r["accuracy"] == grid[r["data"], r["method"]]["accuracy"]
    assert "| arith | RPO (alpha 1) | " in open(os.path.join(out, "lr-sweep.md")).read()


def test_spearman_ranks_ties_by_their_mean():
    assert experiment.ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert experiment.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1)
    assert experiment.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # Pearson's on the ranks, ties included: ranks [1.5, 1.5, 3, 4] against [1, 2, 3, 4]
    assert experiment.spearman([7, 7, 8, 9], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(experiment.spearman([1, 1, 1], [1, 2, 3]))


def test_ches_score_is_the_closed_form_of_the_summed_hidden_states():
    """CHES = <hc, hr> - |hc|^2 with hc, hr the sums of the final hidden states over the positions
    that predict each completion's tokens; checked against the states computed by hand."""
    torch.manual_seed(0)
    enc = load_tokenizer("byte")
    records = [{"prompt": "1+2=", "chosen": "answer 3", "rejected": "answer 4"},
               {"prompt": "10+20=", "chosen": "0+0=0; answer 30", "rejected": "no"}]
    pairs = tokenize_pairs(records, enc, 64)[0]
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)).eval()
    scores = experiment.ches_scores(model, pairs, enc)
    for (p, c, r), score in zip(pairs, scores):
        sums = []
        for completion in (c, r):
            seq = torch.tensor([p + completion])
            m = model.transformer
            with torch.no_grad():
                x = m.wte(seq[:, :-1]) + m.wpe(torch.arange(seq.size(1) - 1))
                h = m.ln_f(m.h[0](x))[0]  # (T, C)
            sums.append(h[len(p) - 1:].sum(0))  # positions len(p)-1 .. predict the completion
        hc, hr = sums
        # float32 sums of two products of size |hc|^2 (about 10^3 here), taken in another order
        assert score == pytest.approx((hc @ hr - hc @ hc).item(), abs=1e-5 * (hc @ hc).item())
    # identical completions: CHES is 0, the chosen's sum against itself
    same = tokenize_pairs([{"prompt": "1+2=", "chosen": "answer 3", "rejected": "answer 3"}], enc, 64)[0]
    assert abs(experiment.ches_scores(model, same, enc)[0]) <= 1e-5 * (hc @ hc).item()


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


@pytest.mark.parametrize("argv, message", [
    (["--lr-sweep", "--lrs", "0"], "--lrs 0.0: each learning rate must be in (0, 1)"),
    (["--demo-range", "--train-flags=--steps 0"], "--steps must be positive, got 0"),
    (["--demo-range", "--train-flags=--los dpo"], "--train-flags: --loss is set by --demo-range for each run"),
    (["--demo-range", "--train-flags='--seed"], "No closing quotation"),
    (["--demo-range", "--jobs"], "--jobs: expected one argument"),
])
def test_a_bad_flag_is_one_error_line(argv, message):
    with pytest.raises(SystemExit) as exit:
        experiment.parse_args(argv)
    err = str(exit.value.code)  # what the interpreter prints to stderr as it exits
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_mean_and_sample_sd():
    """Tables give the mean ± the sample standard deviation (n - 1), and one seed's value alone."""
    assert experiment.mean_sd([1.0, 2.0, 3.0, 4.0], "{:.2f}") == "2.50 ± 1.29"  # the population's is 1.12
    assert experiment.mean_sd([-1.5], "{:+.2f}") == "-1.50"
    assert experiment.mean_sd([-1.0, -3.0], "{:+.2f}") == "-2.00 ± 1.41"


def test_the_model_flops_of_a_step_by_hand():
    """extras/flops.py's model FLOPs (the util of train.py's log, bench.py's figures) for one pair
    (prompt 3, chosen 2, rejected 1 tokens) on a 1-block model of width 4 and vocabulary 10: the
    two rows read 4 and 3 tokens (a completion's last token is only a target), 6 per weight per
    token (12 C^2 weights a block) plus attention's 12 T^2 C a row, and the head's 6 V C at the 3
    completion tokens; one packed row of 4 tokens with --share-prompt; SFT's chosen row alone; a
    third more for a reference forward in the step."""
    from extras import flops
    config = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4)
    pair = [([0, 1, 2], [3, 4], [5])]
    two_rows = (6 * 12 * 16 * 4 + 12 * 16 * 4) + (6 * 12 * 16 * 3 + 12 * 9 * 4) + 6 * 10 * 4 * 3
    assert flops.pair_flops(config, pair) == two_rows == 9984
    assert flops.pair_flops(config, pair, shared=True) == 6 * 12 * 16 * 4 + 12 * 16 * 4 + 720
    assert flops.pair_flops(config, pair, sft=True) == 6 * 12 * 16 * 4 + 12 * 16 * 4 + 6 * 10 * 4 * 2
    assert flops.pair_flops(config, pair, reference=True) == pytest.approx(9984 * 4 / 3)


def test_the_measured_matmuls_are_the_models_own():
    """The products whose throughput util is measured against add up to the step's model FLOPs
    without attention: forward and both backward products of every Linear, the head at the
    completion tokens."""
    from extras import flops
    config = GPTConfig(vocab_size=257, block_size=64, n_layer=4, n_head=4, n_embd=128)
    shapes = flops.matmul_shapes(config, tokens=2880, completion_tokens=1200)
    total = sum(2 * m * k * n * count for (m, k, n), count in shapes)
    assert total == 6 * 12 * 4 * 128 * 128 * 2880 + 6 * 257 * 128 * 1200
    assert len(shapes) == 15
