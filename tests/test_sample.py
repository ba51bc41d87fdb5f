"""Seeing what models write: sample.py, the summary's three examples, experiment.py --plot-runs."""
import json
import os
import sys
from contextlib import nullcontext

import pytest
import torch

import experiment
import sample
from data import answer_of, builtin_data, load_tokenizer
from extras import checkpoints, files
from extras.generation import complete
from model import GPT, GPTConfig
from train import main


@pytest.fixture
def two_ckpts(tmp_path, sft_ckpt):
    """The tiny SFT checkpoint, and one of the same shape with fresh random weights."""
    ckpt = checkpoints.load_checkpoint(sft_ckpt)
    torch.manual_seed(0)
    path = str(tmp_path / "random" / "ckpt.pt")
    files.save_checkpoint(path, {**ckpt, "model": GPT(GPTConfig(**ckpt["model_config"])).state_dict()})
    return [sft_ckpt, path]


def test_sample_prints_each_models_greedy_completions_and_accuracy(two_ckpts, capsys):
    sample.main([*two_ckpts, "--problems", "2"])
    out = capsys.readouterr().out
    problems = builtin_data("arith")["test"][:2]
    names = sample.names_of(two_ckpts)
    assert names[1] == "random" and names[0] != names[1]
    for name, path in zip(names, two_ckpts):
        model = checkpoints.model_from_checkpoint(path)[0]
        texts = complete(model, load_tokenizer("byte"), [p for p, _ in problems], nullcontext(),
                                  torch.device("cpu"))
        lines = [line for line in out.splitlines() if line.startswith(f"    {name} ")]
        assert len(lines) == 2  # one completion per problem
        for line, text, (_, answer) in zip(lines, texts, problems):
            assert line.endswith(text) and ("right" if answer_of(text) == answer else "wrong") in line
        right = sum(answer_of(t) == a for t, (_, a) in zip(texts, problems))
        accuracy_lines = out.split("--- accuracy on these 2 problems\n")[1].splitlines()
        assert [name, f"{right}/2", f"({right / 2:.0%})"] in [line.split() for line in accuracy_lines]
    for prompt, answer in problems:
        assert f"  {prompt}   answer {answer}" in out


def test_sample_own_prompts_sampled_repeat_with_the_seed(two_ckpts, capsys):
    flags = [two_ckpts[0], "--prompt", "12+34=", "--prompt", "5+5=", "--temperature", "1", "--top-k", "5"]
    sample.main(flags)
    first = capsys.readouterr().out
    sample.main(flags)
    assert capsys.readouterr().out == first
    assert "  12+34=\n" in first and "  5+5=\n" in first and "accuracy" not in first


def test_sample_bad_checkpoint_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        sample.main([str(tmp_path / "missing.pt")])
    assert err.value.code == f"error: {tmp_path / 'missing.pt'}: checkpoint not found"


def test_summary_prints_three_examples_and_summary_json_keeps_its_keys(tmp_path, tiny_args, sft_ckpt, capsys):
    summary = main(tiny_args("dpo", "--loss", "dpo", "--init", sft_ckpt, "--steps", "2",
                             "--batch-size", "4", "--eval-every", "2"))
    out = capsys.readouterr().out.split("--- the first 3 test problems, greedy completions\n")[1]
    for prompt, answer in builtin_data("arith")["test"][:3]:
        assert f"  {prompt}   answer {answer}\n    start    " in out  # the starting model (--init)
    assert out.count("\n    trained  ") == 3
    with open(tmp_path / "dpo" / "summary.json") as f:
        assert f.read() == json.dumps(summary, indent=1)  # figures only: no completions in it
    assert list(summary) == ["trained", "reference"] and list(summary["reference"]) == ["gen_accuracy"]
    assert list(summary["trained"]) == [
        "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "logratio/chosen", "logratio/rejected", "penalty/active",
        "gen_accuracy"]


def write_run(folder, sign):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in (10, 20):
            f.write(json.dumps({"step": step, "loss": 0.6, "logratio/chosen": sign * step / 10,
                                "logratio/rejected": -step / 5}) + "\n")
        f.write(json.dumps({"step": 20, "eval/loss": 0.6, "eval/gen_accuracy": 0.5 + sign / 4}) + "\n")


def test_plot_runs_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "dpo", -1)
    write_run(tmp_path / "dpop", +1)
    figure = tmp_path / "runs.png"
    experiment.main(["--plot-runs", str(tmp_path / "dpo"), str(tmp_path / "dpop"), "--figure", str(figure)])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_runs_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "dpo", -1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    experiment.main(["--plot-runs", str(tmp_path / "dpo"), "--figure", str(tmp_path / "runs.png")])
    assert "pip install matplotlib" in capsys.readouterr().out and not (tmp_path / "runs.png").exists()


def test_top_k_one_samples_the_greedy_completion(two_ckpts, capsys):
    """--top-k restricts sampling: with k = 1 every seed and temperature gives the greedy text."""
    sample.main([two_ckpts[1], "--problems", "3"])
    greedy = capsys.readouterr().out.split("\n", 1)[1]
    for seed in ("1", "2"):
        sample.main([two_ckpts[1], "--problems", "3", "--temperature", "2", "--top-k", "1", "--seed", seed])
        assert capsys.readouterr().out.split("\n", 1)[1] == greedy
    sample.main([two_ckpts[1], "--problems", "3", "--temperature", "2", "--seed", "1"])
    assert capsys.readouterr().out.split("\n", 1)[1] != greedy  # without top-k it samples
