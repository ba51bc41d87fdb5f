"""Hugging Face GPT-2 checkpoints in and out, with files the tests write themselves (no network)."""
import json
import os

import pytest
import torch

from conftest import GPT2_RANKS
from extras.hf_gpt2 import load_hf_gpt2, read_safetensors, save_hf_gpt2, write_safetensors
from extras.checkpoints import export_checkpoint, load_checkpoint
from model import GPT, GPTConfig
from train import main

try:
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not installed")

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257)


def random_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY)).eval()
    with torch.no_grad():  # random biases and LayerNorm gains too, so a mix-up cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5 if "bias" in name else 1.0)
    return model


def write_hf_layout(model, folder, fmt, prefix="transformer."):
    """The model in HF's own layout, written by hand: HF key names, Conv1D weights transposed,
    the attention-mask buffers the original files carry, and config.json."""
    os.makedirs(folder, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        name = k.removeprefix("transformer.")
        if name == "lm_head.weight":
            continue
        conv1d = name.endswith(".weight") and name.split(".")[-2] in ("c_attn", "c_proj", "c_fc")
        sd[prefix + name] = (v.t() if conv1d else v).contiguous()
    for i in range(model.config.n_layer):
        sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    c = model.config
    json.dump({"model_type": "gpt2", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
               "n_positions": c.block_size, "vocab_size": c.vocab_size},
              open(os.path.join(folder, "config.json"), "w"))
    if fmt == "bin":
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    else:
        write_safetensors(sd, os.path.join(folder, "model.safetensors"))


def test_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "t.safetensors")
    write_safetensors(tensors, path)
    back = read_safetensors(path)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_safetensors_agrees_with_the_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(4, 3), "h": torch.randn(5).bfloat16()}
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    write_safetensors(tensors, ours)
    st.save_file(tensors, theirs)
    assert all(torch.equal(st.load_file(ours)[k], v) for k, v in tensors.items())
    assert all(torch.equal(read_safetensors(theirs)[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("fmt, prefix", [("safetensors", ""), ("bin", "transformer.")])
def test_load_hand_written_hf_layout(tmp_path, fmt, prefix):
    model = random_gpt()
    write_hf_layout(model, str(tmp_path / "hf"), fmt, prefix)
    loaded = load_hf_gpt2(str(tmp_path / "hf")).eval()
    assert loaded.config.n_head == 2 and loaded.config.block_size == 64
    idx = torch.randint(0, 257, (2, 20))
    torch.testing.assert_close(loaded(idx), model(idx), atol=1e-6, rtol=0)


def test_shape_from_the_weights_without_config_json(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=128, block_size=32, vocab_size=257)).eval()
    write_hf_layout(model, str(tmp_path / "hf"), "safetensors", "")
    os.remove(tmp_path / "hf" / "config.json")
    loaded = load_hf_gpt2(str(tmp_path / "hf" / "model.safetensors"))
    assert (loaded.config.n_layer, loaded.config.n_embd, loaded.config.n_head) == (3, 128, 2)


def test_export_then_load_round_trip(tmp_path):
    model = random_gpt(1)
    save_hf_gpt2(model, str(tmp_path / "out"), eos_id=256)
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["eos_token_id"] == 256 and config["n_positions"] == 64
    idx = torch.randint(0, 257, (2, 30))
    assert torch.equal(load_hf_gpt2(str(tmp_path / "out")).eval()(idx), model(idx))


@needs_transformers
def test_logits_equal_transformers_gpt2(tmp_path):
    """HF's own GPT2LMHeadModel, saved by HF, loads into ours with the same logits; and ours,
    exported, loads into HF with the same logits (float32, max abs difference below 1e-4)."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                        vocab_size=257, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_hf_gpt2(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 257, (3, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"max abs logit difference, HF's checkpoint in ours: {diff:.1e}")
    assert diff < 1e-4, diff

    save_hf_gpt2(random_gpt(2), str(tmp_path / "ours"), eos_id=256)
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        diff = (random_gpt(2)(idx) - back(idx).logits).abs().max().item()
    print(f"max abs logit difference, our export in HF's GPT2LMHeadModel: {diff:.1e}")
    assert diff < 1e-4, diff


def tiny_flags(tmp_path, *extra):
    return ["--loss", "dpop", "--steps", "2", "--batch-size", "4", "--eval-every", "2",
            "--sft-target-acc", "0", "--out", str(tmp_path / "run"), *extra]


def test_init_by_name_from_the_hf_cache(tmp_path, monkeypatch, small_pairs):
    snapshot = tmp_path / "cache" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    write_hf_layout(random_gpt(), str(snapshot), "safetensors", "")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    main(tiny_flags(tmp_path, "--init", "gpt2", "--data", small_pairs, "--block-size", "48"))
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["model_config"]["n_layer"] == 2 and ckpt["model_config"]["block_size"] == 48  # cropped

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as err:
        main(tiny_flags(tmp_path, "--init", "gpt2-medium"))
    assert "no gpt2-medium weights in the Hugging Face cache" in str(err.value)
    assert "huggingface.co/openai-community/gpt2-medium" in str(err.value)


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS), reason="shared/data/gpt2.tiktoken not present")
def test_hf_init_needs_a_matching_tokenizer(tmp_path):
    write_hf_layout(random_gpt(), str(tmp_path / "hf"), "safetensors", "")
    with pytest.raises(SystemExit) as err:  # a 257-token model with GPT-2's 50257-token tokenizer
        main(tiny_flags(tmp_path, "--init", str(tmp_path / "hf"), "--tokenizer", GPT2_RANKS))
    assert "the model has a vocabulary of 257 but --tokenizer" in str(err.value)
    assert "has 50257" in str(err.value) and "--tokenizer gpt2" in str(err.value)


def test_export_hf_after_training(tmp_path, sft_ckpt, small_pairs):
    main(tiny_flags(tmp_path, "--init", sft_ckpt, "--data", small_pairs,
                    "--export-hf", str(tmp_path / "hf")))
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    model = GPT(GPTConfig(**ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["model"])
    idx = torch.randint(0, 257, (2, 16))
    assert torch.equal(load_hf_gpt2(str(tmp_path / "hf")).eval()(idx), model(idx))
    export_checkpoint(str(tmp_path / "run" / "ckpt.pt"), str(tmp_path / "hf2"))
    assert torch.equal(load_hf_gpt2(str(tmp_path / "hf2")).eval()(idx), model(idx))
    if transformers is not None:
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
        with torch.no_grad():
            assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


def test_compile_flag_trains_the_compiled_module_and_saves_the_plain_one(
        tmp_path, sft_ckpt, small_pairs, monkeypatch):
    compiled = []

    def fake_compile(module):  # stands in for torch.compile, which needs minutes on a CPU
        compiled.append(module)
        wrapper = torch.nn.Module()
        wrapper._orig_mod = module
        wrapper.forward = module.forward
        return wrapper
    monkeypatch.setattr(torch, "compile", fake_compile)
    main(tiny_flags(tmp_path, "--init", sft_ckpt, "--data", small_pairs, "--compile"))
    assert len(compiled) == 1
    keys = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["model"].keys()
    assert not any(k.startswith("_orig_mod.") for k in keys)
