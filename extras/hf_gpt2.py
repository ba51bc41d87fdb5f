"""Hugging Face GPT-2 checkpoints in and out: what lets dpop start from the real GPT-2 weights
and hand its models to transformers. Not part of the lesson.

    python train.py --loss dpop --init gpt2 ...         # GPT-2 124M from the Hugging Face cache
    python train.py --init path/to/folder ...           # config.json + model.safetensors (or .bin)
    python train.py ... --export-hf hf_out              # after training, write hf_out/
    python -c "from extras.checkpoints import export_checkpoint; export_checkpoint('out/dpop-arith-seed1337/ckpt.pt', 'hf')"

A small safetensors reader and writer of its own keeps the `safetensors` package out of the
dependencies. Module names in model.py follow GPT-2's, so the mapping is a rename of prefixes and
a transpose of the four Conv1D weights.
"""
import json
import mmap
import os

import torch

from model import GPT, GPTConfig


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


def is_hf_spec(spec):
    """Whether an --init value names Hugging Face weights (a GPT-2 name, a folder, a weights file)
    rather than a train.py checkpoint."""
    return spec in GPT2_SIZES or os.path.isdir(spec) or spec.endswith((".safetensors", ".bin"))


def load_hf_init(spec):
    """The model that --init spec names (see is_hf_spec), as a GPT in float32. LookupError for a
    GPT-2 name that is not in the cache, FileNotFoundError for a missing file, ValueError (or
    another exception) for files that are not a GPT-2 checkpoint."""
    return load_hf_gpt2(find_hf_gpt2(spec) if spec in GPT2_SIZES else spec)
