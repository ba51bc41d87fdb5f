"""A GPT in the style of nanoGPT, small enough to read in one sitting.

The module names follow GPT-2 (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj, ln_f, lm_head) so that GPT-2 checkpoints can be mapped onto it. This file knows
nothing about losses, data, devices or logging: train.py and dpop.py own those.

One deliberate difference from nanoGPT: `forward` always returns logits for EVERY position,
shape (B, T, vocab). nanoGPT returns only the last position when no targets are given, a shortcut
that would silently break preference training, which needs the log-prob of every response token.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=257))
    logits = model(idx)          # idx: (B, T) token ids -> (B, T, 257)

Reading and writing Hugging Face GPT-2 checkpoints lives in extras/hf_gpt2.py: not needed to
follow a training step.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 64      # longest sequence the model sees (positions in wpe)
    vocab_size: int = 257     # 256 bytes + end-of-text for the built-in byte tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True         # GPT-2 has biases in its Linears and LayerNorms


# ---------------------------------------------------------------------------------------------
# The transformer block: attention, then an MLP, each behind a pre-LayerNorm and a residual.

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # split the width into heads: (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:  # generation's KV cache: [keys, values] of the earlier positions
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        # is_causal masks future positions, so right padding never leaks into earlier tokens. A
        # single new token after cached ones may see them all, so it needs no mask. Packed rows
        # (extras/speedups.py) bring their own mask, the same for every head.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attn_mask is None else attn_mask[:, None],
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T == k.size(2))  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------------------------
# The model: embeddings, the blocks, a final LayerNorm and the vocabulary head.

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the layers that write into the residual stream by
        # 1/sqrt(2 * n_layer), because each block adds two of them to the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameter count; the tied head is counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, logits_at=None, caches=None, position_ids=None, attn_mask=None):
        """idx: (B, T) token ids. Returns logits for every position: (B, T, vocab_size).

        logits_at, a (B, T) bool mask: return the logits of those places only, (N, vocab_size)
        with N = logits_at.sum(), in row-major order. Training asks for the completion tokens'
        places: the vocabulary head is the biggest matmul of a small GPT, and the prompt and
        padding logits would only be thrown away. logits_at may also be a pair of (N,) index
        tensors, (rows, columns), which may name a place twice.

        position_ids and attn_mask, for rows that pack several sequences (extras/speedups.py):
        each token's position, (B, T), instead of 0..T-1, and which tokens each token may read,
        (B, T, T) bool, instead of the causal mask.

        caches (generation only): one list per block, empty at first, where each block keeps the
        keys and values of the positions seen so far; a later call then passes only the next
        token, (B, 1), and the model computes nothing twice.
        """
        B, T = idx.shape
        past = caches[0][0].size(2) if caches and caches[0] else 0  # positions already cached
        if position_ids is None:  # (given ones are the caller's to keep below block_size)
            if past + T > self.config.block_size:
                raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
            position_ids = torch.arange(past, past + T, device=idx.device)
        if past and T != 1:
            raise ValueError("after cached positions, pass one token at a time")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i], attn_mask)
        x = self.transformer.ln_f(x)
        if logits_at is not None:
            x = x[logits_at]  # (N, C)
        return self.lm_head(x)  # (B, T, vocab_size), or (N, vocab_size)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, eos_id=None, temperature=0.0, top_k=None, generator=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.

        temperature 0 is greedy decoding; otherwise tokens are sampled from the softmax at that
        temperature, restricted to the top_k most likely tokens when top_k is given. A row stops
        growing once it has produced eos_id (later positions are filled with eos_id), and the
        loop ends when every row has. Returns (B, T + n) with n <= max_new_tokens.

        When everything fits in the context, a KV cache makes each step read one new token (about
        30x less work on the built-in problems); otherwise each step re-reads the context,
        cropped to its last block_size tokens, as nanoGPT does.
        """
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        caches = [[] for _ in self.transformer.h] if idx.size(1) + max_new_tokens <= self.config.block_size else None
        new = idx  # what the next forward reads: everything at first, then the last token if cached
        for _ in range(max_new_tokens):
            context = new if caches is not None else idx[:, -self.config.block_size:]
            logits = self(context, caches=caches)[:, -1, :].float()  # (B, vocab)
            if temperature == 0.0:
                next_id = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            if eos_id is not None:
                next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
                done = done | (next_id == eos_id)
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            new = next_id[:, None]
            if eos_id is not None and bool(done.all()):
                break
        return idx
