"""
LLaMA in one file: the network every model of RLHF is built from (policy, reference, value, reward).

    embedding -> N x (RMSNorm -> attention with rotary embeddings -> residual
                      -> RMSNorm -> SwiGLU MLP -> residual) -> RMSNorm -> output head

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (arXiv 2302.13971). Parameter
names are Meta's (wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm, tok_embeddings, output); the
Hugging Face and Meta checkpoint layouts are translated in one place, `iter_tensors` / `load_weights`.

Left-padded batches are first-class: a (B, T) mask marks real tokens, and positions start at 0 on each
sequence's first real token, so a padded row gives the logits of that sequence alone. `generate` is the one
batched sampler (KV cache, temperature, top-p, EOS) shared by sample.py and the PPO rollout.

    model = Llama.from_pretrained("path/to/llama-7b-hf", device="cuda", dtype=torch.bfloat16)
"""
import glob
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads; fewer = grouped-query attention (LLaMA-2-70B, TinyLlama)
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU width
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # the context a prompt plus its response must fit in


PRESETS = {
    "llama-7b": LlamaConfig(),
    "llama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama2-7b": LlamaConfig(norm_eps=1e-5, max_seq_len=4096),
    # CPU sizes: "tiny" for tests (GQA on purpose), "small" (~100M parameters) for benchmarks
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                        max_seq_len=256),
    "small": LlamaConfig(dim=768, n_layers=8, n_heads=12, vocab_size=32000, hidden_dim=2048,
                         max_seq_len=1024),
}


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# -----------------------------------------------------------------------------
# the network

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in (at least) fp32 even for bf16 weights: x / sqrt(mean(x^2) + eps) * g
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary(positions, head_dim, theta):
    """cos and sin tables (B, T, head_dim) for integer positions (B, T), in fp32.

    Hugging Face order: the rotated pairs are (i, i + head_dim/2), not Meta's interleaved (2i, 2i+1); the
    loader permutes Meta's wq/wk rows so both layouts give the same logits (Su et al. 2021, RoFormer, Eq. 34).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x (B, T, H, hd); rotate each (x_i, x_{i+hd/2}) pair by its angle, in (at least) fp32
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding: (n_layers, B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads or cfg.n_heads, max_len, cfg.dim // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.len = 0  # tokens stored so far; advanced by Llama.hidden after all layers ran

    def update(self, layer, k, v):
        # k, v (B, n_kv, T, hd) -> all keys and values so far (B, n_kv, len + T, hd)
        T = k.shape[2]
        assert self.len + T <= self.k.shape[3], f"KV cache full: {self.len} + {T} > {self.k.shape[3]}"
        self.k[layer, :, :, self.len:self.len + T] = k
        self.v[layer, :, :, self.len:self.len + T] = v
        return self.k[layer, :, :, :self.len + T], self.v[layer, :, :, :self.len + T]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        assert self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}"
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache, layer):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd), S = cached + T
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves a group of q heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        if attn_mask is None:  # no padding, no cache: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU (Shazeer 2020)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # fresh weights (tests, the small world): N(0, 0.02) as in GPT-2; checkpoints overwrite them
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def hidden(self, tokens, mask=None, cache=None):
        """Final hidden states (B, T, dim) for tokens (B, T); mask (B, cached + T): 1 = token, 0 = padding."""
        B, T = tokens.shape
        past = cache.len if cache is not None else 0
        if mask is None:
            positions = torch.arange(past, past + T, device=tokens.device).expand(B, T)
        else:
            assert mask.shape == (B, past + T), f"mask {tuple(mask.shape)} must be (B, cached + T) = {(B, past + T)}"
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # 0 at each first real token
        attn_mask = None
        if mask is not None or past > 0:
            # query i (absolute index past + i) sees key j if j <= past + i and j is a real token, and always
            # itself, so a padding row attends to something and stays finite (its output is never used)
            i = torch.arange(past, past + T, device=tokens.device)[:, None]
            j = torch.arange(past + T, device=tokens.device)[None, :]
            attn_mask = (j <= i)[None, None]  # (1, 1, T, S)
            if mask is not None:
                attn_mask = (attn_mask & mask.bool()[:, None, None, :]) | (j == i)[None, None]  # (B, 1, T, S)
        cos, sin = rotary(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer, block in enumerate(self.layers):
            h = block(h, cos, sin, attn_mask, cache, layer)
        if cache is not None:
            cache.len += T
        return self.norm(h)

    def forward(self, tokens, mask=None, cache=None):
        return self.output(self.hidden(tokens, mask, cache)).float()  # logits (B, T, vocab) in fp32

    def new_cache(self, batch_size, max_len):
        w = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len, w.device, w.dtype)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Build on the meta device, allocate once in `dtype` on `device`, then fill tensor by tensor, so a
        7B checkpoint never needs twice its size in memory."""
        cfg = read_config(path)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)
        unused = load_weights(model, path)
        unused = [k for k in unused if not k.endswith(("rotary_emb.inv_freq", "rope.freqs"))]  # derived tables
        if unused:
            raise ValueError(f"{path}: checkpoint has tensors the model does not use: {', '.join(unused[:5])}")
        return model


# -----------------------------------------------------------------------------
# sampling

def left_pad(seqs, pad_id=0):
    """list of token lists -> tokens (B, T) and mask (B, T), padded on the left."""
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            tokens[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, T - len(s):] = 1
    return tokens, mask


def sample_top_p(probs, top_p, generator=None):
    # nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # mass before this token already >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalizes
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model, tokens, mask, max_new_tokens, temperature=1.0, top_p=1.0, eos_id=None, pad_id=0,
             generator=None, use_cache=True):
    """Sample continuations of left-padded prompts tokens/mask (B, T).

    Returns out (B, N) response tokens (pad_id after EOS), out_mask (B, N) (1 up to and including EOS), and
    logprobs (B, N) fp32 of each sampled token under softmax(logits / temperature) (0 on padding).
    temperature 0 = greedy. use_cache=False re-runs the whole sequence each step (for benchmarks).
    """
    B, T = tokens.shape
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context "
                         f"of {model.cfg.max_seq_len} tokens")
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    seq, seq_mask = tokens, mask
    h = model.hidden(tokens, mask, cache)
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    out, out_mask, out_logprobs = [], [], []
    for _ in range(max_new_tokens):
        logits = model.output(h[:, -1]).float()  # (B, vocab)
        if temperature > 0:
            logits = logits / temperature
        logprobs = F.log_softmax(logits, dim=-1)
        if temperature == 0:
            next_token = logits.argmax(-1)
        else:
            next_token = sample_top_p(logprobs.exp(), top_p, generator)
        lp = logprobs.gather(-1, next_token[:, None]).squeeze(-1)
        out.append(next_token.masked_fill(done, pad_id))
        out_mask.append(~done)
        out_logprobs.append(lp.masked_fill(done, 0.0))
        if eos_id is not None:
            done = done | (next_token == eos_id)
        if done.all():
            break
        # finished rows keep decoding their (valid) samples; those are masked out above and never returned
        seq = torch.cat([seq, next_token[:, None]], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
        if use_cache:
            h = model.hidden(next_token[:, None], seq_mask, cache)
        else:
            h = model.hidden(seq, seq_mask)
    return torch.stack(out, 1), torch.stack(out_mask, 1).long(), torch.stack(out_logprobs, 1)


# -----------------------------------------------------------------------------
# checkpoints: Hugging Face (config.json + safetensors/bin) and Meta (params.json + consolidated.NN.pth)

def _read_json(file):
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: malformed JSON ({e})") from None


def read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    hf, meta = os.path.join(path, "config.json"), os.path.join(path, "params.json")
    try:
        if os.path.exists(hf):
            c = _read_json(hf)
            return LlamaConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                               n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                               hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                               rope_theta=c.get("rope_theta", 10000.0),
                               max_seq_len=c.get("max_position_embeddings", 2048))
        if os.path.exists(meta):
            c = _read_json(meta)
            hidden = int(2 * 4 * c["dim"] / 3)  # Meta's FFN width rule
            if c.get("ffn_dim_multiplier") is not None:
                hidden = int(c["ffn_dim_multiplier"] * hidden)
            hidden = c["multiple_of"] * ((hidden + c["multiple_of"] - 1) // c["multiple_of"])
            vocab = c.get("vocab_size", -1)
            if vocab <= 0:  # -1: "from the tokenizer", which sits beside the weights or one level up
                tok = [p for p in (os.path.join(path, "tokenizer.model"), os.path.join(path, "..", "tokenizer.model"))
                       if os.path.exists(p)]
                if not tok:
                    raise ValueError(f"{meta}: vocab_size is {vocab} and no tokenizer.model was found to count it")
                vocab = Tokenizer(tok[0]).n_words
            return LlamaConfig(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=c.get("n_kv_heads"),
                               vocab_size=vocab, hidden_dim=hidden, norm_eps=c.get("norm_eps", 1e-6),
                               rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_seq_len", 2048))
    except KeyError as e:
        raise ValueError(f"{hf if os.path.exists(hf) else meta}: missing field {e}") from None
    raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def _weight_files(path):
    for pattern in ("*.safetensors", "pytorch_model*.bin", "consolidated.*.pth"):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    raise FileNotFoundError(f"{path}: no weights (*.safetensors, pytorch_model*.bin or consolidated.*.pth)")


def _load_pt(file):
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


# Meta shards a model-parallel checkpoint along these dimensions (norms are replicated)
_META_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}


def iter_tensors(path):
    """(name, tensor) over all weight files of a checkpoint directory, one tensor in memory at a time."""
    files = _weight_files(path)
    if files[0].endswith(".safetensors"):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):  # a sharded checkpoint must have all its shards
            missing = set(_read_json(index)["weight_map"].values()) - {os.path.basename(f) for f in files}
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(sorted(missing))}")
        from safetensors import safe_open
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    elif files[0].endswith(".bin"):
        for file in files:
            yield from _load_pt(file).items()
    else:  # Meta: model-parallel shards are concatenated back, key by key
        shards = [_load_pt(f) for f in files]
        for name in shards[0]:
            dim = _META_SHARD_DIM.get(name.split(".")[-2])
            if len(shards) == 1 or dim is None:
                yield name, shards[0][name]
            else:
                yield name, torch.cat([s[name] for s in shards], dim=dim)


# one table, both directions: Meta name piece <-> Hugging Face name piece
_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
                "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def meta_to_hf_name(name):
    # "layers.3.attention.wq.weight" -> "model.layers.3.self_attn.q_proj.weight"
    module, suffix = name.rsplit(".", 1)
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{suffix}"
    _, i, part = module.split(".", 2)
    return f"model.layers.{i}.{_LAYER_NAMES[part]}.{suffix}"


def hf_to_meta_name(name):
    # the inverse; None for names that are not LLaMA weights
    module, _, suffix = name.rpartition(".")
    for meta, hf in _TOP_NAMES.items():
        if module == hf:
            return f"{meta}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    for meta, hf in _LAYER_NAMES.items():
        if m and m.group(2) == hf:
            return f"layers.{m.group(1)}.{meta}.{suffix}"
    return None


def meta_to_hf_rotary(w, n_heads):
    # Meta rotates interleaved pairs (2i, 2i+1) of each head; we rotate halves (i, i + hd/2): reorder rows
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def load_weights(model, path, prefix=""):
    """Fill `model` from a Hugging Face or Meta checkpoint in `path`, converting names and the rotary order.
    HF names have `prefix` stripped first. Returns the checkpoint keys the model did not use."""
    meta_layout = os.path.exists(os.path.join(path, "params.json")) and not os.path.exists(os.path.join(path, "config.json"))
    params = dict(model.named_parameters())
    cfg, filled, unused = model.cfg, set(), []
    for key, tensor in iter_tensors(path):
        if meta_layout:
            name = key
            if re.search(r"\.attention\.wq\.weight$", key):
                tensor = meta_to_hf_rotary(tensor, cfg.n_heads)
            elif re.search(r"\.attention\.wk\.weight$", key):
                tensor = meta_to_hf_rotary(tensor, cfg.n_kv_heads or cfg.n_heads)
        else:
            name = hf_to_meta_name(key[len(prefix):]) if key.startswith(prefix) else None
        if name not in params:
            unused.append(key)
            continue
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config says "
                             f"{tuple(params[name].shape)} (check config.json / params.json)")
        with torch.no_grad():
            params[name].copy_(tensor)
        filled.add(name)
    if "output.weight" not in filled and "tok_embeddings.weight" in filled:
        hf = os.path.join(path, "config.json")
        if os.path.exists(hf) and _read_json(hf).get("tie_word_embeddings", False):
            with torch.no_grad():
                params["output.weight"].copy_(params["tok_embeddings.weight"])
            filled.add("output.weight")
    missing = [n for n in params if n not in filled]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors the config needs, e.g. {', '.join(missing[:3])}")
    return unused


def save_hf(model, path, extra_config=None):
    """Write `model` in the Hugging Face layout (config.json + model.safetensors), atomically."""
    from safetensors.torch import save_file
    cfg = model.cfg
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
              "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
              "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": False, **(extra_config or {})}
    tensors = {meta_to_hf_name(n): p.detach().cpu().contiguous() for n, p in model.state_dict().items()}
    os.makedirs(path, exist_ok=True)
    for file, write in (("model.safetensors", lambda f: save_file(tensors, f)),
                        ("config.json", lambda f: open(f, "w").write(json.dumps(config, indent=2)))):
        tmp = os.path.join(path, file + ".tmp")
        write(tmp)
        os.replace(tmp, os.path.join(path, file))


# -----------------------------------------------------------------------------
# tokenizer and prompt template

class Tokenizer:
    def __init__(self, model_path):
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"tokenizer {model_path} does not exist")
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0  # LLaMA has none; masks make any id safe

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([i for i in ids if 0 <= i < self.n_words])


PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")


def alpaca_prompt(instruction, input=""):
    # Stanford Alpaca / AlpacaFarm template; real SFT checkpoints were trained on exactly this text
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)
