"""train.py: short real runs of main() on the built-in data with a tiny model."""
import base64
import json
import math
import os

import pytest
import torch

import train
from conftest import TINY_MODEL

from data import load_tokenizer, tokenize_pairs, builtin_data, collate
from dpop import LOSSES, preference_loss
from model import GPT, GPTConfig
from extras import checkpoints
from extras.checkpoints import load_checkpoint
from train import TrainConfig, frozen_copy, get_lr, main, make_optimizer, pair_logps


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_rows(out):
    return [r for r in rows(out) if "loss" in r]


def test_sft_lowers_the_loss(sft_ckpt):
    log = train_rows(os.path.dirname(sft_ckpt))
    assert len(log) == 6 and log[-1]["loss"] < 0.6 * log[0]["loss"]
    ckpt = load_checkpoint(sft_ckpt)
    assert ckpt["done"] and ckpt["step"] == 60 and ckpt["config"]["loss"] == "sft"


@pytest.mark.parametrize("loss", ["dpo", "dpop", "rpo", "ipo", "hinge"])
def test_preference_run_lowers_the_loss(tmp_path, tiny_args, sft_ckpt, loss):
    """30 steps on 17 built-in pairs written as JSONL, one held out (every step sees the same 16)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_data("arith")["train"][:17]))
    main(tiny_args(loss, "--loss", loss, "--init", sft_ckpt, "--data", str(data), "--steps", "30",
                   "--batch-size", "16", "--lr", "1e-3", "--eval-every", "30"))
    log = train_rows(str(tmp_path / loss))
    start = {"ipo": 25.0, "hinge": 1.0}.get(loss, math.log(2))  # step 1 starts at the reference
    if loss == "rpo":  # plus alpha 1 times the chosen NLL per token, logged as its own part
        assert log[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)
        for r in log:
            assert r["loss"] == pytest.approx(r["loss/dpo"] + r["loss/nll"], abs=1e-5)
        start = math.log(2) + log[0]["loss/nll"]  # alpha 1: ln 2 plus the NLL, step 1 at the reference
        assert log[-1]["loss/nll"] < log[0]["loss/nll"]  # the SFT term keeps the chosen likely
    assert log[0]["loss"] == pytest.approx(start, abs=1e-4)
    assert sum(r["loss"] for r in log[-5:]) / 5 < 0.9 * start
    assert log[-1]["rewards/accuracies"] > 0.7
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "logratio/chosen", "penalty/active", "grad_norm",
            "lr", "tokens_per_s"} <= log[-1].keys()


def test_summary_on_built_in_data(tmp_path, tiny_args, sft_ckpt):
    summary = main(tiny_args("dpop", "--loss", "dpop", "--init", sft_ckpt, "--steps", "2",
                             "--batch-size", "4", "--eval-every", "2"))
    trained = summary["trained"]
    assert 0 <= trained["gen_accuracy"] <= 1 and 0 <= summary["reference"]["gen_accuracy"] <= 1
    assert {"loss", "logratio/chosen", "logratio/rejected", "rewards/accuracies"} <= trained.keys()
    with open(tmp_path / "dpop" / "summary.json") as f:
        assert json.load(f) == summary


def test_grad_accumulation_equals_one_big_batch(tmp_path, tiny_args, sft_ckpt, small_pairs):
    """The loop's micro-batches: one batch of 8, 2 x 4 and 4 x 2 micro-batches log the same first
    step: its metrics are means over the same 8 pairs, and its gradient norm the same (float32
    sums in another order: 1e-5 relative); without the division by grad_accum the gradient
    would be grad_accum times larger. (Later steps are left out: AdamW's first update moves each
    weight by about lr times the sign of its gradient, and a near-zero component may flip.)"""
    common = ("--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs, "--steps", "1", "--eval-every", "1")
    main(tiny_args("big", *common, "--batch-size", "8"))
    [big] = train_rows(str(tmp_path / "big"))
    for k in (2, 4):
        main(tiny_args(f"accum{k}", *common, "--batch-size", str(8 // k), "--grad-accum", str(k)))
        [accum] = train_rows(str(tmp_path / f"accum{k}"))
        assert accum["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
        assert accum["logps/chosen"] == pytest.approx(big["logps/chosen"], rel=1e-5)
        assert accum["logps/rejected"] == pytest.approx(big["logps/rejected"], rel=1e-5)
        assert accum["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_reference_gets_no_gradients():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=48))
    ref = frozen_copy(policy)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    enc = load_tokenizer("byte")
    pairs, _, _ = tokenize_pairs(builtin_data("arith")["train"][:4], enc, 48)
    batch = collate(pairs, enc.eot_token)
    policy_c, policy_r = pair_logps(policy, batch)
    with torch.no_grad():
        ref_c, ref_r = pair_logps(ref, batch)
    losses, _, _ = preference_loss(policy_c, policy_r, ref_c, ref_r)
    losses.mean().backward()
    assert not ref.training and all(p.grad is None and not p.requires_grad for p in ref.parameters())
    assert all(p.grad is not None for p in policy.parameters())
    opt = make_optimizer(policy, TrainConfig(lr=1e-3), torch.device("cpu"))
    opt.step()
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in ref.parameters()}
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_args, sft_ckpt,
                                                               small_pairs, monkeypatch):
    common = ("--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs, "--steps", "6",
              "--batch-size", "4", "--lr", "1e-3", "--eval-every", "3")
    main(tiny_args("straight", *common))

    real_save = checkpoints.save_checkpoint

    def save_then_crash(path, obj):
        real_save(path, obj)
        raise KeyboardInterrupt  # the process dies right after the step-3 checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(SystemExit):  # main: one line and exit code 130, not a traceback
        main(tiny_args("interrupted", *common))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert load_checkpoint(str(tmp_path / "interrupted" / "ckpt.pt"))["step"] == 3
    main(tiny_args("interrupted", *common, "--resume"))

    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("straight", "interrupted"))
    assert b["step"] == 6 and b["done"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps_a = [(r["step"], r["loss"]) for r in train_rows(str(tmp_path / "straight"))]
    steps_b = [(r["step"], r["loss"]) for r in train_rows(str(tmp_path / "interrupted"))]
    assert steps_a == steps_b  # each step logged once, with identical values


def test_resume_refuses_a_changed_configuration(tmp_path, tiny_args, sft_ckpt, small_pairs, capsys):
    common = ("--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs, "--steps", "2", "--batch-size", "4", "--eval-every", "2")
    main(tiny_args("run", *common))
    with pytest.raises(SystemExit) as err:
        main(tiny_args("run", *common, "--resume", "--beta", "0.5"))
    assert "another configuration: beta (0.1 -> 0.5)" in str(err.value)


@pytest.mark.slow  # the whole default pipeline, built-in data with its generation evaluations
def test_default_pipeline_trains_the_sft_reference_then_reuses_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48",
            "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--sft-steps", "4", "--sft-batch-size", "8"]
    main(["--loss", "dpop", *tiny])
    assert "stage 1: SFT reference" in capsys.readouterr().out
    sft = load_checkpoint("out/sft-arith-seed1337/ckpt.pt")
    assert sft["done"] and sft["step"] == 4
    dpop = load_checkpoint("out/dpop-arith-seed1337/ckpt.pt")
    assert dpop["config"]["init"] == os.path.join("out", "sft-arith-seed1337", "ckpt.pt")
    main(["--loss", "dpo", *tiny])
    assert "reusing the SFT reference" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_paths_run_on_cpu(tmp_path, tiny_args, sft_ckpt, small_pairs, dtype):
    """CPU autocast and (for float16) the GradScaler branch, so a typo cannot hide until a GPU."""
    summary = main(tiny_args(dtype, "--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs,
                             "--steps", "3", "--batch-size", "4", "--eval-every", "3", "--dtype", dtype))
    assert math.isfinite(summary["trained"]["loss"])
    ckpt = load_checkpoint(str(tmp_path / dtype / "ckpt.pt"))
    assert ckpt["scaler"]["scale"] if dtype == "float16" else ckpt["scaler"] == {}
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # weights stay float32


def test_checkpoint_with_another_vocabulary_is_refused(tmp_path, tiny_args, sft_ckpt):
    ranks = tmp_path / "tiny.tiktoken"  # a valid ranks file with a 300-token vocabulary
    ranks.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)) +
                     "".join(f"{base64.b64encode(b'ab' + bytes([i])).decode()} {256 + i}\n" for i in range(43)))
    with pytest.raises(SystemExit) as err:
        main(tiny_args("vocab", "--init", sft_ckpt, "--tokenizer", str(ranks), "--steps", "1"))
    assert "vocabulary of 257" in str(err.value) and "300" in str(err.value)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=0.1, min_lr_ratio=0.1)
    lrs = [get_lr(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_eval_data_evaluates_on_another_set(tmp_path, tiny_args, sft_ckpt, small_pairs, capsys):
    """Train on all 64 pairs of a JSONL file, evaluate on the built-in held-out pairs and problems."""
    summary = main(tiny_args("x", "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs,
                             "--eval-data", "arith", "--steps", "2", "--batch-size", "4",
                             "--eval-every", "2"))
    assert "64 train pairs, 256 eval pairs, 200 test problems" in capsys.readouterr().out
    assert "gen_accuracy" in summary["trained"] and "gen_accuracy" in summary["reference"]
    with pytest.raises(SystemExit) as err:
        main(tiny_args("y", "--init", sft_ckpt, "--eval-data", "nope.jsonl"))
    assert "--eval-data nope.jsonl: not a built-in data set" in str(err.value)


def test_the_sft_stage_fits_the_data(tmp_path, monkeypatch, capsys):
    """A preference run on 38 pairs trains its SFT reference in batches of at most the 37
    training pairs (one is held out), for 3 passes; --sft-steps, --sft-batch-size and --sft-lr
    set it; the SFT summary reports the chosen completions' held-out loss per token."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "p38.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_data("arith")["train"][:38]))
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "48", "--data", str(data),
            "--steps", "1", "--batch-size", "4"]
    main(["--loss", "dpop", *tiny])
    sft = load_checkpoint("out/sft-p38-seed1337/ckpt.pt")
    assert (sft["config"]["batch_size"], sft["config"]["steps"], sft["step"]) == (37, 3, 3)
    summary = json.load(open("out/sft-p38-seed1337/summary.json"))["trained"]
    assert summary["chosen_ppl"] == pytest.approx(math.exp(summary["chosen_nll"]), rel=1e-9)
    assert 0 < summary["chosen_nll"] < math.log(257) + 1  # a byte model starts near ln 257
    main(["--loss", "dpo", *tiny, "--seed", "2", "--sft-steps", "5", "--sft-batch-size", "8",
          "--sft-lr", "3e-3"])
    sft = load_checkpoint("out/sft-p38-seed2/ckpt.pt")["config"]
    assert (sft["steps"], sft["batch_size"], sft["lr"]) == (5, 8, 3e-3)
    with pytest.raises(SystemExit) as err:
        main(["--loss", "dpo", *tiny, "--seed", "3", "--sft-batch-size", "64"])
    assert "only 37 training pairs; lower --batch-size (for the SFT reference: --sft-batch-size)" in str(err.value)


def test_sft_stops_at_its_target_accuracy_checked_every_sft_check_every_steps(tmp_path, monkeypatch, capsys):
    """The stop rule reads generation accuracy on the eval problems, faked here to reach 60% at
    its third call: SFT from random weights stops at step 9 (--sft-check-every 3), between two
    evaluations (--eval-every 50), with a finished checkpoint. From --init it never stops early."""
    calls = []

    def fake_accuracy(model, enc, problems, ctx, device):
        calls.append(len(problems))
        return (0.6 if len(calls) >= 3 else 0.1), ["" for _ in problems]
    monkeypatch.setattr(train, "generation_accuracy", fake_accuracy)
    flags = [*TINY_MODEL, "--batch-size", "8", "--eval-every", "50", "--sft-check-every", "3"]
    main(["--loss", "sft", *flags, "--steps", "20", "--out", str(tmp_path / "sft")])
    checks = [r for r in rows(tmp_path / "sft") if "eval/gen_accuracy" in r]
    assert [r["step"] for r in checks] == [3, 6, 9]
    assert all("eval/chosen_nll" not in r for r in checks)  # a check between evals: accuracy alone
    ckpt = load_checkpoint(str(tmp_path / "sft" / "ckpt.pt"))
    assert (ckpt["step"], ckpt["done"]) == (9, True)
    assert "stop rule: at 50% greedy accuracy on the eval problems, checked every 3 steps" in capsys.readouterr().out
    main(["--loss", "sft", *flags, "--steps", "6", "--init", str(tmp_path / "sft" / "ckpt.pt"),
          "--out", str(tmp_path / "more")])
    evals = [r for r in rows(tmp_path / "more") if "eval/gen_accuracy" in r]
    assert [r["step"] for r in evals] == [6] and "eval/chosen_nll" in evals[0]
    assert "stop rule" not in capsys.readouterr().out


def test_sft_on_a_file_has_no_stop_rule_and_no_checks(tmp_path, small_pairs, capsys):
    """A JSONL file has no problems to measure accuracy on: no stop-rule line, and no check rows
    between evaluations (no empty "eval step N:" lines), only the evaluations."""
    main(["--loss", "sft", *TINY_MODEL, "--data", small_pairs, "--batch-size", "8", "--steps", "8",
          "--eval-every", "4", "--sft-check-every", "3", "--out", str(tmp_path / "sft")])
    out = capsys.readouterr().out
    assert "stop rule" not in out and "eval step 3" not in out and "eval step 6" not in out
    evals = [r for r in rows(tmp_path / "sft") if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [4, 8] and all("eval/chosen_nll" in r for r in evals)


def test_the_configuration_printed_is_the_model_that_trains(tiny_args, sft_ckpt, small_pairs, capsys):
    """With --init, the start-up lines give the checkpoint's shape, not the flags' defaults."""
    main(tiny_args("run", "--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs, "--steps", "1"))
    out = capsys.readouterr().out
    assert "model: 1 blocks x 2 heads, width 32, context 48, vocabulary 257" in out
    assert f"from {sft_ckpt}" in out and "training: loss dpop, beta 0.1, lam 50.0; 1 steps of 32 pairs" in out


def test_help_groups_every_flag_and_shows_the_stage_defaults(capsys):
    import bench
    from train import parse_args
    for parse, groups in ((parse_args, ["what to train", "optimisation", "the preference loss",
                                        "the SFT model", "the model", "evaluation, logging"]),
                          (bench.parse_args, ["the work", "speed levers", "the machine", "against TRL"])):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = capsys.readouterr().out
        assert all(f"\n{g}" in text for g in groups)
        # every flag has a help text: in argparse's layout its name ends the line or is followed
        # by two spaces and the text
        names = [w.strip("[]") for w in text.split("\noptions:")[0].split() if w.startswith("[--")]
        for name in names:
            line = next(l for l in text.splitlines() if l.strip().startswith(name))
            after = line.strip()[len(name):].split("  ", 1)
            assert len(after) == 2 or text.split(line + "\n", 1)[1].startswith(" " * 20), name
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "optimizer steps (default: sft 600, a preference loss 300)" in text
    assert "peak learning rate (default: sft 1e-3, a preference loss 4e-4)" in text
    assert "--rpo-alpha RPO_ALPHA RPO's weight" in text and "(default: None)" not in text


def test_docs_flags_lists_every_flag_of_help_and_no_other(capsys):
    """docs/flags.md is written by hand: every flag --help shows (a loss's knob from dpop.LOSSES
    too) is in its table, and it names no flag that --help lacks."""
    import re
    from train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    in_help = set(re.findall(r"\[(--[a-z-]+)", capsys.readouterr().out)) - {"--help"}
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "flags.md"), encoding="utf-8") as f:
        table = f.read().split("| --- | --- |")[1].split("\n\n")[0]
    in_docs = set(re.findall(r"`(--[a-z-]+)", table))
    assert in_help == in_docs, f"in --help only: {sorted(in_help - in_docs)}; in docs/flags.md only: {sorted(in_docs - in_help)}"
    assert f"`--loss {{{','.join(['sft', *LOSSES])}}}`" in table  # the losses' names, all of them


def test_simpo_trains_with_no_reference_model(tmp_path, tiny_args, sft_ckpt, monkeypatch, capsys):
    """--loss simpo through the registry: no frozen copy and no precomputed table (even when
    asked for), no log-ratio in the log line, and a summary that compares the trained model with
    the starting model on held-out data."""
    monkeypatch.setattr(train, "frozen_copy", lambda model: pytest.fail("SimPO built a reference model"))
    summary = main(tiny_args("simpo", "--loss", "simpo", "--init", sft_ckpt, "--steps", "20",
                             "--batch-size", "16", "--lr", "1e-3", "--eval-every", "20",
                             "--ref-logps", "precompute"))
    out = capsys.readouterr().out
    assert "training: loss simpo, beta 2.0, simpo_gamma 1.0;" in out and "reference: none" in out
    assert not any(name.startswith("ref_logps") for name in os.listdir(tmp_path / "simpo"))
    log = train_rows(str(tmp_path / "simpo"))
    assert "logratio/chosen" not in log[-1] and "dchosen" not in out.split("step    1 |")[1].split("\n")[0]
    assert sum(r["loss"] for r in log[-5:]) / 5 < log[0]["loss"]
    trained = summary["trained"]
    assert {"loss", "rewards/accuracies", "logratio/chosen", "logratio/rejected", "gen_accuracy"} <= trained.keys()
    assert "gen_accuracy" in summary["reference"]  # the starting model's, on the test problems
    assert "chosen log-prob change" in out and "vs start" in out


def test_optimizer_step_under_float16s_grad_scaler():
    """The float16 branch: an overflowing gradient is the GradScaler's to skip (the weights stay,
    the scale halves, the step counts as an overflow, not as non-finite); a finite one steps."""
    model = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4))
    opt = make_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.tensor(1.0))  # as the loop's backward does: the scale exists from here
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    _, finite, overflow = train.optimizer_step(model, opt, scaler, 1.0, 0.5)
    assert finite and overflow and scaler.get_scale() == 512.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for p in model.parameters():
        p.grad = torch.ones_like(p) * scaler.get_scale()
    _, finite, overflow = train.optimizer_step(model, opt, scaler, 1.0, 0.5)
    assert finite and not overflow and not torch.equal(before["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_held_out_metrics_equal_hand_computed_values(sft_ckpt):
    """evaluate's figures from the log-probs themselves: SFT's NLL per chosen completion token
    (the prompt's tokens not counted), and RPO's loss/nll over the chosen completions' lengths
    (not the rejected's)."""
    from contextlib import nullcontext
    model = checkpoints.model_from_checkpoint(sft_ckpt)[0]
    enc, cpu = load_tokenizer("byte"), torch.device("cpu")
    pairs = tokenize_pairs(builtin_data("arith")["eval"][:12], enc, 48)[0]
    chosen, rejected = train.all_pair_logps(model, pairs, enc, nullcontext(), cpu)
    n_chosen = torch.tensor([len(c) for _, c, _ in pairs], dtype=torch.float32)
    sft = train.evaluate(model, TrainConfig(loss="sft"), enc, nullcontext(), cpu, pairs, None, [])
    assert sft["chosen_nll"] == pytest.approx(-chosen.sum().item() / n_chosen.sum().item(), rel=1e-6)
    start = (chosen + 1.0, rejected - 2.0)  # a made-up starting model: c = -1, r = +2 on every pair
    rpo = train.evaluate(model, TrainConfig(loss="rpo"), enc, nullcontext(), cpu, pairs, start, [])
    assert rpo["loss/nll"] == pytest.approx((-chosen / n_chosen).mean().item(), rel=1e-6)
    assert rpo["logratio/chosen"] == pytest.approx(-1.0, abs=1e-5)
    assert rpo["loss/dpo"] == pytest.approx(-math.log(1 / (1 + math.exp(0.3))), rel=1e-5)  # beta (c - r) = -0.3
