"""Greedy (or sampled) completions of many prompts at once: what evaluation's generation accuracy,
the summary's examples and sample.py read. Prompts of equal token length are decoded together,
so no padding is needed and each row is exactly what one prompt alone would give.
"""
import torch


@torch.no_grad()
def complete(model, enc, prompts, ctx, device, max_new_tokens=48, batch_size=512, **sampling):
    """The model's completion of each prompt, as text, in prompt order: greedy, or sampled with
    generate's temperature, top_k and generator. Prompts of equal token length are decoded
    together, batch_size at a time (no padding needed): the same completions as one prompt at a
    time, about 100x faster on the built-in problems."""
    model.eval()
    by_length = {}
    for i, prompt in enumerate(prompts):
        ids = [enc.eot_token] + enc.encode_ordinary(prompt)
        by_length.setdefault(len(ids), []).append((i, ids))
    texts = [None] * len(prompts)
    for n, group in by_length.items():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            idx = torch.tensor([ids for _, ids in batch], device=device)
            with ctx:
                out = model.generate(idx, max_new_tokens, eos_id=enc.eot_token, **sampling)
            for (i, _), row in zip(batch, out[:, n:].tolist()):
                texts[i] = enc.decode([t for t in row if t != enc.eot_token])
    return texts
