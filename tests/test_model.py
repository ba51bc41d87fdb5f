"""model.py: shapes, causality, generation, and a checkpoint round trip."""
import torch

from model import GPT, GPTConfig
from extras.checkpoints import load_checkpoint
from extras.files import save_checkpoint
from train import build_model, TrainConfig

EOS = 256


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"block_size": 16, "vocab_size": 257, "n_layer": 2, "n_head": 2,
                            "n_embd": 32, **kw})).eval()


def test_forward_returns_logits_for_every_position():
    model = tiny_gpt()
    idx = torch.randint(0, 257, (3, 9))
    assert model(idx).shape == (3, 9, 257)


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = tiny_gpt()
    idx = torch.randint(0, 257, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, 257, (2, 5))
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_embeddings_are_tied():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_generate_greedy_is_argmax_and_stops_at_eos():
    model = tiny_gpt()
    idx = torch.randint(0, 256, (4, 3))
    out = model.generate(idx, max_new_tokens=5)
    assert out.shape == (4, 8)
    for t in range(3, 8):  # each new token is the argmax given the tokens before it
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))
    # make EOS the most likely token for row 0 only: it stops and is padded with EOS, the others go on
    forward = model.forward
    boost = torch.zeros(4, 1, 257)
    boost[0, :, EOS] = 1e4
    model.forward = lambda idx, **kw: forward(idx, **kw) + boost
    out = model.generate(idx, max_new_tokens=5, eos_id=EOS)
    assert out.shape == (4, 8) and (out[0, 3:] == EOS).all()
    # and when every row ends, generation ends
    boost[:, :, EOS] = 1e4
    assert model.generate(idx, max_new_tokens=5, eos_id=EOS).shape == (4, 4)


def test_kv_cache_gives_the_logits_of_a_full_forward():
    model = tiny_gpt()
    idx = torch.randint(0, 257, (3, 10))
    full = model(idx)
    caches = [[] for _ in model.transformer.h]
    steps = [model(idx[:, :4], caches=caches)]  # a 4-token prompt, then one token at a time
    steps += [model(idx[:, t:t + 1], caches=caches) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert caches[0][0].shape == (3, 2, 10, 16)  # (B, nh, T, hs) keys of all 10 positions
    try:
        model(idx[:, :2], caches=caches)
        raise AssertionError("two new tokens after a cache must be refused")
    except ValueError as e:
        assert "one token at a time" in str(e)


def test_generate_sampling_top_k_1_is_greedy():
    model = tiny_gpt()
    idx = torch.randint(0, 256, (2, 3))
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(idx, 6, temperature=0.8, top_k=1, generator=g)
    assert torch.equal(sampled, model.generate(idx, 6))


def test_generate_crops_context_to_block_size():
    model = tiny_gpt()
    out = model.generate(torch.randint(0, 256, (1, 15)), max_new_tokens=4)
    assert out.shape == (1, 19)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = tiny_gpt(seed=3)
    path = str(tmp_path / "ckpt.pt")
    cfg = TrainConfig()
    save_checkpoint(path, {"model": model.state_dict(), "model_config": vars(model.config),
                           "config": vars(cfg)})
    assert not (tmp_path / "ckpt.pt.tmp").exists()  # the temporary file was renamed into place

    class Enc:
        n_vocab = 257
    loaded = build_model(cfg, Enc(), load_checkpoint(path)).eval()
    idx = torch.randint(0, 257, (2, 16))
    assert torch.equal(model(idx), loaded(idx))
