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

The last section reads and writes Hugging Face GPT-2 checkpoints (config.json plus
model.safetensors or pytorch_model.bin), with a small safetensors reader and writer of its own so
that the `safetensors` package is not a dependency.
"""
import json
import math
import mmap
import os
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
        # (data.collate_shared) bring their own mask, the same for every head.
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

    def forward(self, idx, positions=None, caches=None, pos=None, attn_mask=None):
        """idx: (B, T) token ids. Returns logits for every position: (B, T, vocab_size).

        With positions, a (B, T) bool mask, returns the logits of those positions only, (N,
        vocab_size) with N = positions.sum(), in row-major order. Training asks for the completion
        positions: the vocabulary head is the biggest matmul of a small GPT, and the prompt and
        padding logits would only be thrown away. positions may also be a pair of (N,) index
        tensors, (rows, columns), which may name a position twice.

        pos and attn_mask, for rows that pack several sequences (data.collate_shared): each
        token's position, (B, T), instead of 0..T-1, and which tokens each token may read,
        (B, T, T) bool, instead of the causal mask.

        caches (generation only): one list per block, empty at first, where each block keeps the
        keys and values of the positions seen so far; a later call then passes only the next
        token, (B, 1), and the model computes nothing twice.
        """
        B, T = idx.shape
        past = caches[0][0].size(2) if caches and caches[0] else 0  # positions already cached
        if pos is None:  # (given positions are the caller's to keep below block_size)
            if past + T > self.config.block_size:
                raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(past, past + T, device=idx.device)
        if past and T != 1:
            raise ValueError("after cached positions, pass one token at a time")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i], attn_mask)
        x = self.transformer.ln_f(x)
        if positions is not None:
            x = x[positions]  # (N, C)
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


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 checkpoints in and out

GPT2_SIZES = {  # the four released GPT-2 models: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}
# HF's GPT-2 stores these four Linears as Conv1D, whose weight is (in, out): transposed from ours
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """A safetensors file as {name: tensor}. The format: an 8-byte little-endian header length N,
    N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw data."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not F32, F16 or BF16")
        begin, end = info["data_offsets"]
        data = bytearray(buf[8 + n + begin:8 + n + end])  # a copy: the tensor outlives the mmap
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        tensors[name] = torch.frombuffer(data, dtype=dtype).reshape(info["shape"]) if data else \
            torch.empty(info["shape"], dtype=dtype)
    buf.close()
    return tensors


def write_safetensors(tensors, path):
    """The inverse of read_safetensors (float32, float16 and bfloat16 tensors)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        blob = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for blob in blobs:
            f.write(blob)


def from_hf_state_dict(sd, config_json=None):
    """A GPT (in float32) from a Hugging Face GPT-2 state dict, with keys like
    "transformer.h.0.attn.c_attn.weight" or, in the original files, "h.0.attn.c_attn.weight".
    The shape comes from config.json when given; otherwise from the weights, with 64-wide heads
    (every released GPT-2 has them), since the head count is not in the weights."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    sd.pop("lm_head.weight", None)  # tied to wte
    if config_json is not None:
        config = GPTConfig(block_size=config_json["n_positions"], vocab_size=config_json["vocab_size"],
                           n_layer=config_json["n_layer"], n_head=config_json["n_head"],
                           n_embd=config_json["n_embd"], bias=True)
    else:
        vocab_size, n_embd = sd["wte.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
        config = GPTConfig(block_size=sd["wpe.weight"].shape[0], vocab_size=vocab_size,
                           n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd, bias=True)
    ours = {"transformer." + k: (v.t() if k.endswith(CONV1D) else v).float() for k, v in sd.items()}
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    model = GPT(config)
    model.load_state_dict(ours)
    return model


def find_hf_gpt2(name):
    """The newest snapshot folder of GPT-2 `name` in the Hugging Face cache that holds weights:
    $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub. LookupError if none."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    for repo in (f"models--openai-community--{name}", f"models--{name}"):
        snapshots = os.path.join(cache, repo, "snapshots")
        names = os.listdir(snapshots) if os.path.isdir(snapshots) else []
        found = [os.path.join(snapshots, d) for d in names
                 if {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(os.path.join(snapshots, d)))]
        if found:
            return max(found, key=os.path.getmtime)
    raise LookupError(f"no {name} weights in the Hugging Face cache {cache}; get config.json and "
                      f"model.safetensors from huggingface.co/openai-community/{name} into a folder "
                      f"and pass --init FOLDER (or download them into the cache)")


def load_hf_gpt2(path):
    """A GPT from a Hugging Face GPT-2 checkpoint: a folder holding config.json and
    model.safetensors or pytorch_model.bin, or one of those weight files itself."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        candidates = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")]
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin in it")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    config_path = os.path.join(folder, "config.json")
    config_json = json.load(open(config_path)) if os.path.exists(config_path) else None
    return from_hf_state_dict(sd, config_json)


def save_hf_gpt2(model, folder, eos_id=None):
    """Write model as a Hugging Face GPT-2 checkpoint (config.json and model.safetensors) that
    transformers' GPT2LMHeadModel.from_pretrained(folder) loads with the same logits."""
    c = model.config
    if not c.bias:
        raise ValueError("Hugging Face's GPT-2 has biases: a model with bias=False cannot be exported")
    os.makedirs(folder, exist_ok=True)
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    sd = {k: (v.t() if k.endswith(CONV1D) else v).float().contiguous() for k, v in sd.items()}
    sd.pop("lm_head.weight")  # tied: HF rebuilds it from wte
    write_safetensors(sd, os.path.join(folder, "model.safetensors"))
    eos = c.vocab_size - 1 if eos_id is None else eos_id
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
              "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
