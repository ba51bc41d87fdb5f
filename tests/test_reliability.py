"""Bad input, interruption, numerical faults, and what a run finds on disk (torn or stale files,
a full or read-only disk, another run on the same folder): one-line errors, nothing lost."""
import base64
import dataclasses
import errno
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

import train
from conftest import GPT2_RANKS, ROOT, TINY_MODEL
from data import DataError, builtin_data, load_tokenizer, tokenize_pairs
from extras import checkpoints, config, files, speedups
from extras.formats import parse_jsonl
from extras.checkpoints import load_checkpoint
from model import GPT, GPTConfig
from train import TrainConfig, main

CPU = torch.device("cpu")


def error_of(argv):
    """Run main(argv), expect it to stop, and return its one-line message."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("flags, message", [
    (["--loss", "kto"], "argument --loss: invalid choice: 'kto'"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--batch-size", "-2"], "--batch-size must be positive"),
    (["--grad-accum", "0"], "--grad-accum must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--beta", "-0.1"], "--beta must be positive"),
    (["--beta", "0"], "--beta must be positive"),
    (["--lam", "-5"], "--lam must be zero or positive"),
    (["--lam", "-1"], "--lam must be zero or positive"),
    (["--tokenizer", "nope"], "--tokenizer 'nope': not 'byte'"),
    (["--n-layer", "2"], "--n-layer 2, but --init"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: not a built-in data set"),
    (["--eval-data", "nope.jsonl"], "--eval-data nope.jsonl: not a built-in data set"),
    # accepted and trained before, or a traceback (issue 14)
    (["--grad-clip=-1"], "--grad-clip must be zero or positive, got -1.0"),
    (["--n-layer", "-1"], "--n-layer must be positive, got -1"),
    (["--n-head", "0"], "--n-head must be positive"),
    (["--warmup", "2"], "--warmup must be in [0, 1], got 2.0"),
    (["--warmup=-0.5"], "--warmup must be in [0, 1]"),
    (["--min-lr-ratio", "5"], "--min-lr-ratio must be in [0, 1], got 5.0"),
    (["--weight-decay=-3"], "--weight-decay must be zero or positive"),
    (["--n-embd", "100", "--n-head", "3"], "--n-embd 100 must be a multiple of --n-head 3"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--block-size", "1000000000"], "--block-size must be in [1, 65536], got 1000000000"),
    (["--block-size", "0"], "--block-size must be in [1, 65536]"),
    (["--sft-target-acc", "1.5"], "--sft-target-acc must be in [0, 1]"),
    (["--seed=-1"], "--seed must be in [0, 2**32)"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--beta", "inf"], "--beta must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--data", "arith-xl"], "not a built-in data set"),
    (["--init", "nope.pt"], "nope.pt: checkpoint not found"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--dtype", "float8"], "--dtype float8: choose"),
    (["--loss", "dpop", "--label-smoothing", "0.1"], "applies to --loss dpo only"),
    # a loss's knob for a loss that does not read it; the SFT stage's flags under their own names
    (["--loss", "dpo", "--lam", "5"], "--lam applies to --loss dpop only"),
    (["--loss", "sft", "--rpo-alpha", "0.5"], "--rpo-alpha applies to --loss rpo only"),
    (["--sft-steps", "0"], "--sft-steps must be positive, got 0"),
    (["--sft-steps=-5"], "--sft-steps must be positive, got -5"),
    (["--sft-lr=-1"], "--sft-lr must be positive"),
    (["--sft-batch-size", "0"], "--sft-batch-size must be positive"),
    (["--ref-logps", "sometimes"], "--ref-logps sometimes: choose auto, precompute or every-step"),
])
def test_bad_flags(tiny_args, sft_ckpt, flags, message):
    assert message in error_of(tiny_args("bad", "--init", sft_ckpt, "--steps", "1", *flags))


def test_bad_checkpoints(tmp_path, tiny_args, sft_ckpt):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(sft_ckpt, "rb").read()[:5000])
    assert "not a readable checkpoint" in error_of(tiny_args("x", "--init", str(truncated)))
    assert "it may be truncated" in error_of(tiny_args("x", "--init", str(truncated)))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert "not a readable checkpoint" in error_of(tiny_args("x", "--init", str(text)))
    assert "it is a text file, not a checkpoint" in error_of(tiny_args("x", "--init", str(text)))
    pairs = tmp_path / "pairs.jsonl"  # --init given the data file: say what it is
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    message = error_of(tiny_args("x", "--init", str(pairs)))
    assert "it is JSON text, not a checkpoint" in message and "UnpicklingError); it may be" not in message
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "the file is empty" in error_of(tiny_args("x", "--init", str(empty)))
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    assert "not a checkpoint written by train.py" in error_of(tiny_args("x", "--init", str(other)))
    broken = tmp_path / "broken.pt"
    ckpt = load_checkpoint(sft_ckpt)
    ckpt["model"].pop("transformer.ln_f.weight")
    torch.save(ckpt, broken)
    assert "the weights do not fit the model" in error_of(tiny_args("x", "--init", str(broken)))


def test_data_file_problems(tmp_path, tiny_args, sft_ckpt, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty.jsonl: no preference pairs" in error_of(tiny_args("x", "--init", sft_ckpt,
                                                                    "--data", str(empty)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"}) + "\n" +
                     "".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1),
                                         "rejected": str(i + 2)}) + "\n" for i in range(20)))
    main(tiny_args("ok", "--init", sft_ckpt, "--data", str(pairs), "--steps", "1", "--batch-size", "4"))
    assert "skipped 1 pairs" in capsys.readouterr().out
    same = tmp_path / "same.jsonl"  # every pair skipped: say so, not only "no pairs"
    same.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": "x", "rejected": "x"}) + "\n"
                            for i in range(3)))
    assert ("no preference pairs in the file: all 3 were skipped because their chosen equals their "
            "rejected") in error_of(tiny_args("x", "--init", sft_ckpt, "--data", str(same)))


@pytest.mark.parametrize("text, line", [
    ('[\n  {"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n]\n', 1),  # a pretty-printed array
    ('[{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]\n', 1),        # an array on one line
    ('{\n  "prompt": "1+1=",\n  "chosen": "2",\n  "rejected": "3"\n}\n', 1),  # a pretty-printed object
])
def test_json_that_is_not_json_lines_says_so(tmp_path, text, line):
    path = tmp_path / "pairs.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        parse_jsonl(str(path))
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert "the format is JSON Lines: one object per line" in str(err.value)


def test_a_typo_in_json_lines_gets_no_json_lines_hint(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"\n')
    with pytest.raises(DataError) as err:
        parse_jsonl(str(path))
    assert "invalid JSON" in str(err.value) and "JSON Lines" not in str(err.value)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, tiny_args, sft_ckpt, small_pairs, monkeypatch):
    real_loss = train.preference_loss
    calls = []

    def sometimes_nan(*args, **kwargs):
        losses, c, r = real_loss(*args, **kwargs)
        calls.append(1)
        return (losses * float("nan") if len(calls) in (2, 3) else losses), c, r
    monkeypatch.setattr(train, "preference_loss", sometimes_nan)
    main(tiny_args("nan", "--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs, "--steps", "5", "--batch-size", "4",
                   "--eval-every", "100"))
    rows = [json.loads(r) for r in open(tmp_path / "nan" / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 1, 2, 2, 2]
    weights = load_checkpoint(str(tmp_path / "nan" / "ckpt.pt"))["model"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_too_many_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(
        tmp_path, tiny_args, sft_ckpt, small_pairs, monkeypatch):
    args = tiny_args("bad", "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--steps", "20", "--batch-size", "4",
                     "--eval-every", "2", "--max-bad-steps", "3")
    real_loss = train.preference_loss
    calls = []

    def nan_after_four(*args, **kwargs):
        losses, c, r = real_loss(*args, **kwargs)
        calls.extend([1] if losses.requires_grad else [])  # count training steps, not evaluations
        return (losses if len(calls) <= 4 else losses * float("nan")), c, r
    monkeypatch.setattr(train, "preference_loss", nan_after_four)
    message = error_of(args)
    assert "3 steps in a row had a non-finite loss or gradient (up to step 7, with --lr 0.0004, --beta 0.1)" in message
    assert message.endswith("try a lower --lr or --beta")  # float32 already: no --dtype advice
    ckpt = load_checkpoint(str(tmp_path / "bad" / "ckpt.pt"))
    assert ckpt["step"] == 6 and not ckpt["done"]  # step 6's weights are those of step 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ---------------------------------------------------------------------------------------------
# What a run finds on disk: a stale SFT reference, a torn metrics line, a corrupt cache

def test_a_reference_made_with_another_recipe_is_refused(tmp_path, monkeypatch, small_pairs):
    """A 2-step SFT run in the default reference folder of --data small_pairs, then a preference
    run that would train its reference as the SFT stage fits these 61 training pairs (3 passes
    in batches of 61: 3 steps): it stops."""
    monkeypatch.chdir(tmp_path)
    main(["--loss", "sft", *TINY_MODEL, "--data", small_pairs, "--steps", "2", "--batch-size", "8",
          "--sft-target-acc", "0"])
    message = error_of(["--loss", "dpop", *TINY_MODEL, "--data", small_pairs, "--steps", "1",
                        "--sft-target-acc", "0"])
    path = os.path.join("out", "sft-pairs-seed1337", "ckpt.pt")
    assert message == (f"error: {path} is an SFT reference made with another recipe: steps (2 -> 3), "
                       f"global batch (8 = 8 x 1 x 1 processes -> 61 = 61 x 1 x 1 processes); delete "
                       f"{os.path.dirname(path)} to train one with these flags, pass --init {path} to use "
                       f"it as it is, or use the flags it was made with")


def sft_config(tmp_path, **changes):
    return train.resolve(TrainConfig(loss="sft", out=str(tmp_path / "sft"), **changes))


def fake_reference(cfg, done=True):
    """An SFT checkpoint as train.py writes it, for the recipe checks (they read no weights)."""
    files.save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), {
        "model": {}, "model_config": {}, "config": dataclasses.asdict(cfg), "done": done,
        "processes": 1, "files": checkpoints.file_digests(cfg)})


def claimed(sft_cfg, run_cfg):
    """What claim_reference says of the reference in sft_cfg.out: finished (reuse it) or not."""
    with checkpoints.claim_reference(sft_cfg, os.path.join(sft_cfg.out, "ckpt.pt"), run_cfg) as finished:
        return finished


@pytest.mark.parametrize("made_with, now, differ", [
    ({}, {}, None),
    # how a run is watched and kept, not what it learns
    ({}, {"log_every": 1, "max_bad_steps": 3, "compile": True, "export_hf": "hf"}, None),
    ({}, {"batch_size": 32, "grad_accum": 2}, None),  # the same global batch, split in two
    ({"sft_target_acc": 0.0}, {"sft_target_acc": 0.0, "eval_every": 7}, None),  # no stop at an eval
    # the case: a smoke run's reference, then the demo's shape
    ({"n_layer": 1, "n_head": 2, "n_embd": 32}, {}, "n_layer (1 -> 4), n_head (2 -> 4), n_embd (32 -> 128)"),
    ({}, {"eval_every": 7}, "eval_every (100 -> 7)"),  # SFT stops at its target accuracy: at an eval
    ({"eval_every": 50}, {}, None),  # ... but evaluations at multiples of the check add no stops
    ({}, {"sft_check_every": 50}, "sft_check_every (10 -> 50)"),  # ... or at a check between evals
    ({"sft_target_acc": 0.0}, {"sft_target_acc": 0.0, "sft_check_every": 7}, None),
    ({}, {"dtype": "float32"}, "dtype ('auto' -> 'float32')"),
    ({}, {"seed": 1}, "seed (1337 -> 1)"),
    ({}, {"lr": 3e-3}, "lr (0.001 -> 0.003)"),
    ({}, {"batch_size": 32}, "global batch (64 = 64 x 1 x 1 processes -> 32 = 32 x 1 x 1 processes)"),
])
def test_the_reference_is_reused_only_with_the_same_recipe(tmp_path, made_with, now, differ):
    fake_reference(sft_config(tmp_path, **made_with))
    run_cfg = TrainConfig(loss="dpop", out=str(tmp_path / "dpop"))
    if differ is None:
        assert claimed(sft_config(tmp_path, **now), run_cfg) is True
    else:
        with pytest.raises(DataError) as err:
            claimed(sft_config(tmp_path, **now), run_cfg)
        assert f"made with another recipe: {differ}; delete {tmp_path / 'sft'}" in str(err.value)


def test_a_reference_from_before_the_loss_registry_is_reused(tmp_path):
    """Checkpoints written before the registry hold every loss's knob at its value (lam 50.0 in an
    SFT run's config); knobs the run's loss does not read count for neither --resume nor reuse."""
    cfg = sft_config(tmp_path)
    fake_reference(cfg)
    ckpt = checkpoints.load_checkpoint(os.path.join(cfg.out, "ckpt.pt"))
    ckpt["config"].update(lam=50.0, rpo_alpha=1.0, label_smoothing=0.0)
    files.save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), ckpt)
    assert claimed(sft_config(tmp_path), TrainConfig(loss="dpop", out=str(tmp_path / "dpop"))) is True
    checkpoints.check_resume(cfg, ckpt)  # no DataError
    with pytest.raises(DataError, match=r"beta \(0.1 -> 0.2\)"):  # a knob it reads still counts
        checkpoints.check_resume(sft_config(tmp_path, beta=0.2), ckpt)


def test_a_reference_from_before_sft_check_every_was_checked_at_each_eval(tmp_path):
    """A checkpoint without the knob stopped on a check at each --eval-every: it is reused only
    when the two intervals agree."""
    fake_reference(sft_config(tmp_path, eval_every=50))
    path = os.path.join(tmp_path, "sft", "ckpt.pt")
    ckpt = checkpoints.load_checkpoint(path)
    del ckpt["config"]["sft_check_every"]
    files.save_checkpoint(path, ckpt)
    run_cfg = TrainConfig(loss="dpop", out=str(tmp_path / "dpop"))
    with pytest.raises(DataError, match=r"another recipe: sft_check_every \(50 -> 10\);"):
        claimed(sft_config(tmp_path, eval_every=50, sft_check_every=10), run_cfg)
    assert claimed(sft_config(tmp_path, eval_every=50, sft_check_every=50), run_cfg) is True


def test_a_reference_trained_on_an_edited_file_is_refused(tmp_path, small_pairs):
    data = tmp_path / "pairs.jsonl"
    data.write_text(open(small_pairs).read())
    fake_reference(sft_config(tmp_path, data=str(data)))
    with open(data, "a") as f:  # one more pair: same path, another data set
        f.write(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(DataError, match=f"another recipe: the contents of {data};"):
        claimed(sft_config(tmp_path, data=str(data)), TrainConfig(loss="dpo", out=str(tmp_path / "dpo")))


def test_a_reference_on_a_file_is_reused_however_its_path_is_spelled(tmp_path, small_pairs):
    """The same contents under another spelling of the path (here /x/./pairs.jsonl) are the same
    data; and a file has no problems to stop SFT at its target accuracy, so how often that stop
    is checked does not matter either."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(open(small_pairs).read())
    fake_reference(sft_config(tmp_path, data=str(data), sft_check_every=50, eval_every=25))
    run_cfg = TrainConfig(loss="dpo", out=str(tmp_path / "dpo"))
    assert claimed(sft_config(tmp_path, data=str(tmp_path / "." / "pairs.jsonl")), run_cfg) is True
    other = tmp_path / "other.jsonl"
    other.write_text(open(small_pairs).read().replace("answer", "result"))  # another data set
    with pytest.raises(DataError, match=f"another recipe: data \\('{data}' -> '{other}'\\);"):
        claimed(sft_config(tmp_path, data=str(other)), run_cfg)


def test_reference_claim_cases(tmp_path):
    """An unfinished reference is continued, also with --resume (stage 2 has not started); a
    finished one with --resume and no stage-2 checkpoint has nothing to continue; an unreadable
    one, or one in the run's own --out, stops the run."""
    sft_cfg = sft_config(tmp_path)
    fake_reference(sft_cfg, done=False)
    assert claimed(sft_cfg, TrainConfig(loss="dpop", out=str(tmp_path / "dpop"), resume=True)) is False
    fake_reference(sft_cfg, done=True)
    with pytest.raises(DataError, match="--resume: no checkpoint at .*dpop/ckpt.pt to continue"):
        claimed(sft_cfg, TrainConfig(loss="dpop", out=str(tmp_path / "dpop"), resume=True))
    with pytest.raises(DataError, match="is the SFT reference's folder; give the dpop run another --out"):
        claimed(sft_cfg, TrainConfig(loss="dpop", out=sft_cfg.out))
    with open(os.path.join(sft_cfg.out, "ckpt.pt"), "r+b") as f:
        f.truncate(300)
    with pytest.raises(DataError, match="it may be truncated; delete .*sft to train the reference again"):
        claimed(sft_cfg, TrainConfig(loss="dpop", out=str(tmp_path / "dpop")))


def test_resume_drops_a_torn_last_metrics_line(tmp_path, tiny_args, sft_ckpt, small_pairs):
    common = ("--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--batch-size", "4",
              "--eval-every", "2")
    main(tiny_args("run", *common, "--steps", "2"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.69')  # a power cut while a row was written
    main(tiny_args("run", *common, "--steps", "4", "--resume"))
    rows = [json.loads(line) for line in open(metrics)]  # every line parses
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_a_checkpoint_that_cannot_be_resumed_says_what_to_do(tmp_path, tiny_args, sft_ckpt, small_pairs):
    args = tiny_args("run", "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--batch-size", "4",
                     "--steps", "2", "--eval-every", "2")
    main(args)
    ckpt_path = str(tmp_path / "run" / "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path)
    del ckpt["optimizer"]  # another version's checkpoint
    torch.save(ckpt, ckpt_path)
    assert error_of(args + ["--resume"]) == (f"error: {ckpt_path}: cannot be resumed (KeyError: 'optimizer'); "
                                             f"drop --resume to start from step 0, or use another --out")
    with open(ckpt_path, "r+b") as f:
        f.truncate(1000)
    message = error_of(args + ["--resume"])
    assert message.startswith(f"error: --resume: {ckpt_path}: not a readable checkpoint")
    assert message.endswith("it may be truncated; drop --resume to start from step 0, or use another --out")


def test_a_corrupt_reference_cache_is_computed_again(tmp_path, capsys):
    torch.manual_seed(0)
    ref = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=48)).eval()
    enc = load_tokenizer("byte")
    pairs = tokenize_pairs(builtin_data("arith")["train"][:8], enc, 48)[0]

    def cached():
        return speedups.reference_train_logps(
            ref, pairs, str(tmp_path), lambda m, some: train.all_pair_logps(m, some, enc, nullcontext(), CPU))
    first = cached()
    [cache] = glob.glob(str(tmp_path / "ref_logps-*.pt"))
    with open(cache, "r+b") as f:
        f.truncate(100)  # torn
    capsys.readouterr()
    again = cached()
    assert f"warning: {cache}: cannot use the cached reference log-probs" in capsys.readouterr().out
    assert torch.equal(again, first)  # the same computation in the same process
    assert torch.equal(cached(), first) and f"reference log-probs from {cache}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The file system: folders that cannot be written, a full disk, a folder in use

def test_folders_that_cannot_be_written_are_refused_before_any_work(tmp_path, tiny_args, sft_ckpt,
                                                                     monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    run = tiny_args("x", "--init", sft_ckpt)
    assert error_of([*run, "--out", str(notes)]) == f"error: --out {notes} is a file, not a folder; use another --out"
    assert error_of([*run, "--out", str(notes / "run")]) == \
        f"error: --out {notes / 'run'} is under {notes}, a file, not a folder; use another --out"
    assert error_of([*run, "--export-hf", str(notes)]) == \
        f"error: --export-hf {notes} is a file, not a folder; use another --export-hf"
    monkeypatch.setattr(config.os, "access", lambda path, mode: False)  # as if read-only (root writes anyway)
    assert error_of(run) == (f"error: --out {tmp_path / 'x'}: cannot write in {tmp_path} (no permission, "
                             f"or a read-only disk); use another --out")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a read-only folder")
def test_a_read_only_folder_is_refused(tmp_path, tiny_args, sft_ckpt):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "cannot write in" in error_of(tiny_args("x", "--init", sft_ckpt, "--out", str(locked / "run")))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), SystemExit(130)])
def test_a_failed_checkpoint_write_keeps_the_last_one(tmp_path, tiny_args, sft_ckpt, small_pairs,
                                                      monkeypatch, failure):
    """The second checkpoint fails half-written: a full disk, or a second Ctrl-C. The first one
    stays loadable, no temporary file is left, and --resume continues from it."""
    args = tiny_args("run", "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--steps", "4",
                     "--batch-size", "4", "--eval-every", "2")
    real_save, calls = torch.save, []

    def fail_the_second(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise failure
        real_save(obj, f)
    monkeypatch.setattr(files.torch, "save", fail_the_second)
    ckpt = tmp_path / "run" / "ckpt.pt"
    if isinstance(failure, OSError):
        assert error_of(args) == (f"error: {ckpt}: cannot write it (No space left on device); the disk is "
                                  f"full: free some space, then run the same command with --resume (the "
                                  f"last checkpoint, {ckpt}, is intact)")
    else:
        with pytest.raises(SystemExit):
            main(args)
    monkeypatch.undo()
    assert load_checkpoint(str(ckpt))["step"] == 2
    assert not glob.glob(str(tmp_path / "run" / "*.tmp"))
    main(args + ["--resume"])
    assert load_checkpoint(str(ckpt))["done"]


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json"])
def test_a_file_that_cannot_be_written_is_one_line(tmp_path, tiny_args, sft_ckpt, small_pairs, name):
    (tmp_path / "run" / name).mkdir(parents=True)  # a folder where the run writes a file
    message = error_of(tiny_args("run", "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs,
                                 "--steps", "2", "--batch-size", "4", "--eval-every", "2"))
    assert message.startswith(f"error: {tmp_path / 'run' / name}: cannot write it (Is a directory); ")


def test_a_second_run_on_a_folder_in_use_stops_at_once(tmp_path, tiny_args, sft_ckpt, small_pairs):
    """The lock in this very process: flock locks of two open() calls exclude each other too."""
    args = tiny_args("run", "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--steps", "1",
                     "--batch-size", "4")
    with files.FolderLock(str(tmp_path / "run")):
        assert error_of(args) == (f"error: another run is using {tmp_path / 'run'} (pid {os.getpid()}); "
                                  f"wait for it or use another --out")
    main(args)  # free again


# ---------------------------------------------------------------------------------------------
# Real processes: signals and kill -9

def run_args(out, *extra):
    return [sys.executable, "train.py", *TINY_MODEL, "--sft-target-acc", "0", "--log-every", "1",
            "--out", str(out), *extra]


def start_and_signal(argv, metrics, sig, after_rows=5):
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= after_rows:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=60)
    return proc.returncode, output


def comparable(out):
    """The metrics rows without the timing field, which differs from run to run."""
    rows = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "util")} for r in rows]


def interrupt_args(sft_ckpt, small_pairs):
    return ["--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs, "--steps", "150",
            "--batch-size", "8", "--lr", "1e-3", "--eval-every", "50"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, sft_ckpt, small_pairs):
    """The uninterrupted run that the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(run_args(out, *interrupt_args(sft_ckpt, small_pairs)), cwd=ROOT, check=True,
                   capture_output=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_bitwise(tmp_path, sft_ckpt, small_pairs, straight_run, sig):
    common = interrupt_args(sft_ckpt, small_pairs)
    straight, interrupted = straight_run, tmp_path / "interrupted"

    code, output = start_and_signal(run_args(interrupted, *common),
                                    str(interrupted / "metrics.jsonl"), sig)
    assert code == 128 + sig, output
    stopped = load_checkpoint(str(interrupted / "ckpt.pt"))
    assert 5 <= stopped["step"] < 150 and not stopped["done"]
    assert f"stopped at step {stopped['step']}" in output and "Traceback" not in output
    subprocess.run(run_args(interrupted, *common, "--resume"), cwd=ROOT, check=True, capture_output=True)

    a, b = load_checkpoint(str(straight / "ckpt.pt")), load_checkpoint(str(interrupted / "ckpt.pt"))
    assert b["done"] and b["step"] == 150
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])
    assert comparable(straight) == comparable(interrupted)


@pytest.mark.slow
def test_kill_9_never_leaves_a_broken_checkpoint(tmp_path, sft_ckpt, small_pairs):
    """A checkpoint at every step, and kill -9 at three moments: each time ckpt.pt loads."""
    out = tmp_path / "run"
    argv = run_args(out, "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--steps", "100000",
                    "--batch-size", "4",
                    "--eval-every", "1")
    steps = []
    for after_rows in (3, 7, 11):
        code, _ = start_and_signal(argv + (["--resume"] if steps else []), str(out / "metrics.jsonl"),
                                   signal.SIGKILL, after_rows)
        assert code == -signal.SIGKILL
        steps.append(load_checkpoint(str(out / "ckpt.pt"))["step"])
    assert steps == sorted(steps) and steps[0] >= 1


# ---------------------------------------------------------------------------------------------
# Real processes: two runs at once, a full disk, a second Ctrl-C, torchrun

SLOWED = """import sys, time
sys.path.insert(0, {root!r})
import train
step = train.optimizer_step
def slowed(*args):
    time.sleep({delay})
    return step(*args)
train.optimizer_step = slowed
train.main(sys.argv[1:])
"""


def slowed_train(delay, *flags):
    """The command line of train.py whose optimizer steps each take delay seconds more, so that
    a test can act during a run."""
    return [sys.executable, "-u", "-c", SLOWED.format(root=ROOT, delay=delay), *flags]


def rows_in(path):
    return len(open(path).readlines()) if os.path.exists(path) else 0


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def dpo_flags(out, sft_ckpt, small_pairs, *extra):
    return [*TINY_MODEL, "--sft-target-acc", "0", "--log-every", "1", "--out", str(out), "--loss", "dpo",
            "--init", sft_ckpt, "--data", small_pairs, "--batch-size", "4", *extra]


@pytest.mark.slow
def test_a_second_run_on_the_same_out_stops_at_once(tmp_path, sft_ckpt, small_pairs):
    out = tmp_path / "run"
    flags = dpo_flags(out, sft_ckpt, small_pairs, "--steps", "1000", "--eval-every", "5")
    first = subprocess.Popen(slowed_train(0.05, *flags), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: rows_in(out / "metrics.jsonl") >= 2, first)
    second = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert first.poll() is None  # the second run did not disturb the first
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=60)[0]
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr == f"error: another run is using {out} (pid {first.pid}); wait for it or use another --out\n"
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in output
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 2 and not ckpt["done"]


@pytest.mark.slow
def test_a_second_run_waits_for_the_sft_reference_then_reuses_it(tmp_path, small_pairs):
    """--loss dpop and --loss dpo started together both want the default SFT reference: the
    second waits while the first trains it, then reuses it."""
    flags = [*TINY_MODEL, "--sft-target-acc", "0", "--log-every", "1", "--data", small_pairs,
             "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--sft-steps", "40",
             "--sft-batch-size", "8"]  # a short SFT stage, long enough for the second run to wait
    sft = tmp_path / "out" / "sft-pairs-seed1337"
    first = subprocess.Popen(slowed_train(0.25, "--loss", "dpop", *flags), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: rows_in(sft / "metrics.jsonl") >= 1, first)  # 39 steps, 10 s, to go
    second = subprocess.Popen(slowed_train(0, "--loss", "dpo", *flags), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_out, second_out = first.communicate(timeout=300)[0], second.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, first_out[-2000:] + second_out[-2000:]
    assert "=== stage 1: SFT reference" in first_out and "=== stage 1" not in second_out
    folder = os.path.join("out", "sft-pairs-seed1337")
    assert f"waiting: another run (pid {first.pid}) is using {folder}" in second_out
    assert f"reusing the SFT reference {os.path.join(folder, 'ckpt.pt')}" in second_out
    reference = load_checkpoint(str(sft / "ckpt.pt"))
    assert reference["done"] and reference["step"] == 40
    for loss in ("dpop", "dpo"):
        ckpt = load_checkpoint(str(tmp_path / "out" / f"{loss}-pairs-seed1337" / "ckpt.pt"))
        assert ckpt["done"] and ckpt["config"]["init"] == os.path.join(folder, "ckpt.pt")


@pytest.mark.slow
def test_a_file_size_limit_is_one_line(tmp_path, sft_ckpt, small_pairs):
    """ulimit -f 64: the kernel refuses to grow a file past 64 KiB (Python ignores the SIGXFSZ
    that comes with it); the first checkpoint is larger. Needs no privileges, unlike a tmpfs."""
    out = tmp_path / "run"
    flags = dpo_flags(out, sft_ckpt, small_pairs, "--steps", "4", "--eval-every", "2")
    proc = subprocess.run(["bash", "-c", 'ulimit -f 64 && exec "$@"', "bash", sys.executable, "train.py", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: {out / 'ckpt.pt'}: cannot write it (") and "then run the same command" in line
    assert not glob.glob(str(out / "*.tmp")) and not (out / "ckpt.pt").exists()


def can_mount():
    return shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not can_mount(), reason="needs unshare -m (root) for a small tmpfs")
def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, sft_ckpt, small_pairs):
    """--out on a 480 KiB tmpfs (in a private mount namespace): the step-5 checkpoint (about
    300 KiB) fits, the step-10 one does not. One line, the step-5 checkpoint stays loadable, no
    temporary file is left; once the disk is larger, --resume finishes the run."""
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    command = shlex.join([sys.executable, "train.py", *dpo_flags(out, sft_ckpt, small_pairs, "--steps", "20",
                                                                 "--eval-every", "5")])
    script = f"""mount -t tmpfs -o size=480k tmpfs {disk}
{command} > /dev/null 2> {tmp_path}/stderr; echo $? > {tmp_path}/code
ls -A {out} > {tmp_path}/files; cp {out}/ckpt.pt {tmp_path}/last.pt
mount -o remount,size=4m {disk}
{command} --resume > /dev/null && cp {out}/ckpt.pt {tmp_path}/final.pt"""
    subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=ROOT, check=True, timeout=300)
    assert (tmp_path / "code").read_text() == "1\n"
    ckpt = out / "ckpt.pt"
    assert (tmp_path / "stderr").read_text() == (
        f"error: {ckpt}: cannot write it (No space left on device); the disk is full: free some space, "
        f"then run the same command with --resume (the last checkpoint, {ckpt}, is intact)\n")
    assert not any(name.endswith(".tmp") for name in (tmp_path / "files").read_text().split())
    last, final = load_checkpoint(str(tmp_path / "last.pt")), load_checkpoint(str(tmp_path / "final.pt"))
    assert last["step"] == 5 and not last["done"] and final["step"] == 20 and final["done"]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, sft_ckpt, small_pairs):
    out = tmp_path / "run"
    proc = subprocess.Popen(slowed_train(0.5, *dpo_flags(out, sft_ckpt, small_pairs, "--steps", "1000",
                                                         "--eval-every", "1")),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (out / "ckpt.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    output = ""
    for line in proc.stdout:  # the first one is handled: the run will stop after this step
        output += line
        if line.startswith("SIGINT: saving a checkpoint"):
            break
    proc.send_signal(signal.SIGINT)  # while the step (0.5 s) still runs
    output += proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGINT
    assert "SIGINT again: stopped at once (the last checkpoint is intact)" in output
    assert "Traceback" not in output and "stopped at step" not in output
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] >= 1 and not glob.glob(str(out / "*.tmp"))


def torchrun(*flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "train.py", *flags]


def worker_pids(torchrun_pid):
    """{rank: pid} of the processes torchrun started (its children whose environment has RANK)."""
    workers = {}
    for task in os.listdir(f"/proc/{torchrun_pid}/task"):
        for child in open(f"/proc/{torchrun_pid}/task/{task}/children").read().split():
            env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
            workers.update({int(e[5:]): int(child) for e in env if e.startswith(b"RANK=")})
    return workers


@pytest.mark.slow
def test_sigint_to_one_torchrun_rank_stops_both_and_resume_continues(tmp_path, sft_ckpt, small_pairs):
    """SIGINT to rank 1 only: both ranks stop after the same step (rank 0 writes the one
    checkpoint), and --resume under torchrun ends where a run never interrupted ends."""
    common = [*TINY_MODEL, "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--steps", "200",
              "--batch-size", "2", "--lr", "1e-3", "--eval-every", "100", "--log-every", "1",
              "--sft-target-acc", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    subprocess.run(torchrun(*common, "--out", str(straight)), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen(torchrun(*common, "--out", str(stopped)), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: rows_in(stopped / "metrics.jsonl") >= 5, proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    ckpt = load_checkpoint(str(stopped / "ckpt.pt"))
    step = ckpt["step"]
    assert 5 <= step < 200 and not ckpt["done"], output[-3000:]
    # rank 0 was not signalled itself: it stops because rank 1 was, and says so once
    assert output.count("stopped at step") == 1 and f"stopped at step {step} by SIGTERM" in output
    assert [r["step"] for r in comparable(stopped) if "loss" in r][-1] == step
    # torchrun's report: each rank leaves on its own, rank 1 with 130 (SIGINT), rank 0 with 143 (it
    # stops as for SIGTERM), except that once both are past the barrier after the checkpoint,
    # torchrun ends whichever rank is still running with its own SIGTERM (-15): rank 1 or rank 0,
    # by the scheduler's timing. A crash (exit code 1), or both ranks killed, fails here.
    codes = set(re.findall(r"exitcode  : (-?\d+) ", output))
    assert codes and codes <= {"130", "143", "-15"} and codes & {"130", "143"}, output[-3000:]

    resumed = subprocess.run(torchrun(*common, "--out", str(stopped), "--resume"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {stopped / 'ckpt.pt'} at step {step}" in resumed.stdout
    a, b = load_checkpoint(str(straight / "ckpt.pt")), load_checkpoint(str(stopped / "ckpt.pt"))
    assert b["done"] and b["step"] == 200
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the same sums, in the same order
    assert comparable(straight) == comparable(stopped)


def test_a_run_never_overwrites_the_checkpoint_it_starts_from(tmp_path, tiny_args, sft_ckpt):
    """--init pointing at the checkpoint --out would hold (or --export-hf at --init's folder) is
    refused before any work, and the checkpoint is left as it was."""
    before = open(sft_ckpt, "rb").read()
    out = os.path.dirname(sft_ckpt)
    message = error_of([*TINY_MODEL, "--loss", "dpo", "--init", sft_ckpt, "--out", out, "--steps", "1"])
    assert "is the checkpoint this run would write" in message and "another --out" in message
    message = error_of(tiny_args("hf", "--init", sft_ckpt, "--export-hf", out, "--steps", "1"))
    assert "would overwrite --init" in message
    assert open(sft_ckpt, "rb").read() == before


def test_the_knobs_declare_what_resume_and_the_sft_reference_may_change():
    """The field sets that once were hand-kept lists, now derived from TrainConfig's knobs: what
    --resume may change, what a reused SFT reference may differ in, what it inherits."""
    from extras.config import fields_where
    from train import TrainConfig
    watch = {"out", "resume", "export_hf", "log_every", "max_bad_steps", "compile", "ref_logps",
             "full_logits", "share_prompt"}
    assert fields_where(TrainConfig, "reference_may_differ") == watch
    assert fields_where(TrainConfig, "resume_may_change") == watch | {
        "steps", "eval_every", "device", "sft_target_acc", "sft_check_every"}
    assert fields_where(TrainConfig, "sft_inherits") == {
        "data", "eval_data", "tokenizer", "seed", "device", "dtype", "eval_every", "log_every",
        "sft_target_acc", "sft_check_every", "max_bad_steps", "dropout", "n_layer", "n_head",
        "n_embd", "block_size"}


def write_ranks(path, ranks):
    """A .tiktoken ranks file: one "base64(token) rank" line per (token, rank)."""
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
    return str(path)


def test_tokenizer_files_are_checked_before_use(tmp_path, tiny_args):
    """Every .tiktoken the tool reads is checked: empty, cut short (at a line, so what is left
    parses), without a byte the data needs, numbered with a gap, or not a ranks file: one line
    each, no traceback. A whole byte-level file passes."""
    whole = [(bytes([i]), i) for i in range(256)] + [(b"12", 256), (b"+1", 257)]
    cases = {
        write_ranks(tmp_path / "empty.tiktoken", []): "the file is empty",
        write_ranks(tmp_path / "few.tiktoken", whole[:100]): "156 of the 256 single bytes have no rank",
        write_ranks(tmp_path / "gpt2.tiktoken", whole): "258 ranks where the real file has 50256",
        write_ranks(tmp_path / "gap.tiktoken", whole[:256] + [(b"12", 300)]): "ranks, not numbered 0 to n-1",
    }
    (tmp_path / "text.tiktoken").write_text("hello world\n")
    cases[str(tmp_path / "text.tiktoken")] = "not a .tiktoken ranks file"
    for path, message in cases.items():
        assert message in error_of(tiny_args("t", "--loss", "sft", "--tokenizer", path, "--steps", "1")), path
    assert load_tokenizer(write_ranks(tmp_path / "mine.tiktoken", whole)).n_vocab == 259


def test_devices_and_a_compiler_that_are_not_here_are_refused_up_front(tiny_args, monkeypatch):
    if not torch.backends.mps.is_available():
        assert "--device mps: no Apple GPU (MPS) is available here" in error_of(tiny_args("d", "--device", "mps"))
    monkeypatch.setattr(config.shutil, "which", lambda name: None)
    assert "--compile: no C++ compiler found" in error_of(tiny_args("c", "--loss", "sft", "--compile"))


def test_init_given_a_run_folder_points_at_its_checkpoint(tiny_args, sft_ckpt):
    folder = os.path.dirname(sft_ckpt)
    message = error_of(tiny_args("f", "--init", folder, "--steps", "1"))
    assert f"is a train.py run's folder: pass its checkpoint, --init {sft_ckpt}" in message


def test_resume_without_the_first_runs_init_says_so_before_any_work(tmp_path, tiny_args, sft_ckpt,
                                                                     small_pairs, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default SFT model's folder would be out/ here
    main(tiny_args("run", "--loss", "dpo", "--init", sft_ckpt, "--data", small_pairs, "--steps", "2",
                   "--batch-size", "4"))
    message = error_of(tiny_args("run", "--loss", "dpo", "--data", small_pairs, "--steps", "4",
                                 "--batch-size", "4", "--resume"))
    assert f"was started from --init {sft_ckpt}; add --init {sft_ckpt}" in message
    assert not os.path.exists(tmp_path / "out" / "sft-pairs-seed1337" / "ckpt.pt")  # no SFT stage ran


def test_held_out_data_is_checked(tmp_path, tiny_args, sft_ckpt, small_pairs, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(open(small_pairs).readline())
    message = error_of(tiny_args("h", "--init", sft_ckpt, "--data", str(one), "--steps", "1", "--batch-size", "1"))
    assert f"--data {one}: nothing is held out for evaluation" in message and "--eval-data FILE" in message
    message = error_of(tiny_args("h", "--init", sft_ckpt, "--data", small_pairs, "--eval-data", str(one),
                                 "--steps", "1", "--batch-size", "1"))
    assert f"--eval-data {one}: nothing is held out" in message
    ten = tmp_path / "ten.jsonl"  # 5% of 10 pairs rounds to none: one is held out all the same
    ten.write_text("".join(open(small_pairs).readlines()[:10]))
    summary = main(tiny_args("ten", "--init", sft_ckpt, "--data", small_pairs, "--eval-data", str(ten),
                             "--steps", "1", "--batch-size", "4"))
    assert "logratio/chosen" in summary["trained"]
    # ten's pairs are small_pairs' first ten, all of which train: the held-out one is counted
    assert "warning: 1 of the 1 held-out pairs are training pairs too" in capsys.readouterr().out
    main(tiny_args("other", "--init", sft_ckpt, "--data", small_pairs, "--steps", "1", "--batch-size", "4"))
    assert "training pairs too" not in capsys.readouterr().out


def test_the_reference_cache_is_keyed_by_how_it_was_computed(tmp_path):
    """Two dtypes (or devices) compute other bits: each gets its own cached table."""
    enc = load_tokenizer("byte")
    pairs = tokenize_pairs(builtin_data("arith")["train"][:8], enc, 48)[0]
    ref = train.frozen_copy(GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=32)))
    for how in ("cpu torch.float32", "cpu torch.bfloat16", "cpu torch.float32"):
        speedups.reference_train_logps(ref, pairs, str(tmp_path), lambda m, some: train.all_pair_logps(
            m, some, enc, nullcontext(), CPU), how)
    assert len(list(tmp_path.glob("ref_logps-*.pt"))) == 2


@pytest.mark.parametrize("script, argv, message", [
    ("sample", ["x.pt", "--top-k", "0"], "--top-k must be positive, got 0"),
    ("sample", ["x.pt", "--top-k=-3"], "--top-k must be positive, got -3"),
    ("sample", ["x.pt", "--temperature", "nan"], "--temperature must be a finite number"),
    ("sample", ["x.pt", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    ("bench", ["--batch", "0"], "--batch must be positive, got 0"),
    ("bench", ["--warmup", "5", "--steps", "3"], "--warmup 5 leaves no timed step of --steps 3"),
    ("bench", ["--threads", "0"], "--threads must be positive"),
    ("bench", ["--device", "tpu"], "--device tpu: choose cpu or cuda"),
    ("bench", ["--vs-trl", "/no/such/python"], "--vs-trl /no/such/python: no such python"),
    ("experiment", ["--demo-range", "--jobs", "0"], "--jobs must be positive, got 0"),
    ("experiment", ["--demo-range", "--kernels", "avx1024"], "--kernels avx1024: not a kernel path"),
])
def test_every_scripts_flags_are_checked_up_front(script, argv, message):
    module = __import__(script)
    with pytest.raises(SystemExit) as err:
        module.parse_args(argv)
    assert str(err.value).startswith("error: ") and message in str(err.value) and "\n" not in str(err.value)


def test_init_with_a_tokenizer_of_its_size_but_other_tokens_is_refused(tmp_path, tiny_args, sft_ckpt):
    """The checkpoint records its tokenizer's identity, not only its size: 257 tokens in another
    order than the byte tokenizer's are refused; the same tokens from a file are accepted."""
    byte_tokens = [(bytes([i]), i) for i in range(256)]
    same = write_ranks(tmp_path / "same.tiktoken", byte_tokens)
    other = write_ranks(tmp_path / "other.tiktoken", [(bytes([255 - i]), i) for i in range(256)])
    message = error_of(tiny_args("o", "--init", sft_ckpt, "--tokenizer", other, "--steps", "1"))
    assert f"--init {sft_ckpt} was trained with another tokenizer than --tokenizer {other}" in message
    assert "use its own (--tokenizer byte)" in message
    main(tiny_args("s", "--init", sft_ckpt, "--tokenizer", same, "--steps", "1", "--batch-size", "4"))
