"""extras/generation.py: batched completions equal one prompt at a time, whatever the mix of
prompt lengths and the order the prompts come in."""
from contextlib import nullcontext

import torch

from data import load_tokenizer
from extras.generation import complete
from model import GPT, GPTConfig


def test_batched_completions_equal_one_prompt_at_a_time():
    """Each prompt gets its own completion back, in its own place: prompts of three lengths,
    interleaved and repeated, and batches smaller than a group (batch_size 2), against generate
    on each prompt alone. A random model with its weights scaled up writes a different text for
    each prompt (wide logit gaps, so no near-tie flips between the two ways of batching), so a
    completion handed to the wrong prompt shows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    enc = load_tokenizer("byte")
    prompts = ["12+3=", "7+7=", "123+456=", "9+1=", "12+3=", "555+444=", "1+2=", "40+2="]
    got = complete(model, enc, prompts, nullcontext(), torch.device("cpu"), max_new_tokens=12, batch_size=2)
    expected = []
    for prompt in prompts:
        idx = torch.tensor([[enc.eot_token] + enc.encode_ordinary(prompt)])
        row = model.generate(idx, 12, eos_id=enc.eot_token)[0, idx.size(1):].tolist()
        expected.append(enc.decode([t for t in row if t != enc.eot_token]))
    assert got == expected
    assert len(set(expected)) == len(set(prompts))  # one text per prompt: a mix-up cannot pass unseen
