"""
LLaMA in one file: the network every model of RLHF is built from (policy, reference, value, reward).

    embedding -> N x (RMSNorm -> attention with rotary embeddings -> residual
                      -> RMSNorm -> SwiGLU MLP -> residual) -> RMSNorm -> output head

Touvron et al. 2023 (arXiv 2302.13971), with Meta's parameter names (wq, w1, attention_norm, ...);
checkpoints.py reads the Hugging Face and Meta layouts and writes Hugging Face's. Left-padded batches are first-class: a
(B, T) mask marks real tokens and positions start at 0 on each sequence's first one, so a padded row gives
the logits of that sequence alone. `generate` is the one batched sampler (static KV cache, temperature,
top-p, EOS, optionally a CUDA graph) of sample.py and the PPO rollout.

    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=176))
    out, out_mask = generate(model, tokens, mask, max_new_tokens=32, temperature=1.0, eos_id=2)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support import cudagraph, formats


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
    rope_scaling: dict | None = None  # None = plain rotary; else Hugging Face's rope_scaling (see rotary_frequencies)
    max_seq_len: int = 2048  # the context a prompt plus its response must fit in


PRESETS = {
    "llama-7b": LlamaConfig(),
    "llama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama2-7b": LlamaConfig(norm_eps=1e-5, max_seq_len=4096),
    # CPU sizes: "tiny" for tests (GQA on purpose), "small" (~100M parameters) for benchmarks
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176, max_seq_len=256),
    "small": LlamaConfig(dim=768, n_layers=8, n_heads=12, vocab_size=32000, hidden_dim=2048, max_seq_len=1024),
}


# ----------------------------------------------------------------------------- the network

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


def rotary_frequencies(head_dim, theta, scaling=None, device=None):
    """The angle per position of each rotated pair, theta_i = theta^(-2i/head_dim), i < head_dim/2 (RoFormer),
    in fp32; `scaling` (Hugging Face's rope_scaling names) stretches them for a longer context:
        linear  theta_i / factor: positions read as t / factor (position interpolation, Chen et al. 2023,
                arXiv 2306.15595)
        llama3  by wavelength 2 pi / theta_i against L = original_max_position_embeddings: shorter than
                L / high_freq_factor kept, longer than L / low_freq_factor divided by factor, in between blended
                with s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor):
                (1 - s) theta_i / factor + s theta_i (LLaMA 3.1; Meta's apply_scaling in llama-models)"""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (head_dim/2,)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        s = ((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - s) * inv_freq / scaling["factor"] + s * inv_freq
    else:
        assert kind == "default", f"rope_type {kind!r} is not implemented (default, linear, llama3)"
    return inv_freq


def rotary(positions, head_dim, theta, scaling=None):
    """cos and sin tables (B, T, head_dim) for integer positions (B, T), in fp32. Hugging Face order: the rotated
    pairs are (i, i + head_dim/2), not Meta's interleaved (2i, 2i+1); the loader permutes Meta's wq/wk rows so
    both layouts give the same logits (Su et al. 2021, RoFormer, Eq. 34)."""
    inv_freq = rotary_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x (B, T, H, hd); rotate each (x_i, x_{i+hd/2}) pair by its angle, in (at least) fp32
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, hd): the same angles for every head
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class KVCache:
    """Keys and values of every layer preallocated for prompt + new tokens, k, v (n_layers, B, n_kv_heads, L,
    head_dim), and which slots hold a real token, valid (B, L): written in place, so no shape ever changes."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads or cfg.n_heads, max_len, cfg.dim // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)

    def update(self, layer, k, v, slots):
        # k, v (B, n_kv, T, hd) written at slots (T,) -> every slot's keys and values (B, n_kv, L, hd)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        assert self.n_heads % self.n_kv_heads == 0, \
            f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}"
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache, layer, slots):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v, slots)  # (B, n_kv, L, hd)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves a group of q heads
            group = (-1, -1, self.n_heads // self.n_kv_heads, -1, -1)
            k, v = k[:, :, None].expand(group).flatten(1, 2), v[:, :, None].expand(group).flatten(1, 2)
        # no mask (no padding, no cache): the fused causal kernel
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
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

    def forward(self, x, cos, sin, attn_mask, cache=None, layer=0, slots=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache, layer, slots)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # keep only each block's input for backward and recompute the rest there (set by the training script)
        self.activation_checkpointing = False
        # fresh weights (tests, the small world): N(0, 0.02) as in GPT-2; checkpoints overwrite them
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def hidden(self, tokens, mask=None, cache=None, start=None):
        """Final hidden states (B, T, dim) for tokens (B, T); mask (B, T): 1 = token, 0 = padding. With a cache
        the tokens go to its slots start, start + 1, ... (start: a long tensor (1,)) and see the real tokens in
        the slots before them; the cache fixes every shape, so a step costs the same at any start."""
        B, T = tokens.shape
        slots, attn_mask = None, None
        if cache is None and mask is None:  # no padding, no cache: positions 0..T-1, the fused causal kernel
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
            slots = torch.arange(T, device=tokens.device) + (0 if cache is None else start)  # (T,)
            valid = mask if cache is None else cache.valid.index_copy_(1, slots, mask)  # (B, S), S = T or L
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0).index_select(1, slots)  # 0 at each first token
            # the query in slot i sees slot j if j <= i and j holds a real token, and always itself, so a
            # padding row attends to something and stays finite (its output is never used)
            i, j = slots[:, None], torch.arange(valid.shape[1], device=tokens.device)
            attn_mask = ((j <= i) & valid[:, None, None, :]) | (j == i)  # (B, 1, T, S)
        cos, sin = rotary(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, self.cfg.rope_scaling)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer, block in enumerate(self.layers):
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, attn_mask, use_reentrant=False)  # backward recomputes the block
            else:
                h = block(h, cos, sin, attn_mask, cache, layer, slots)
        return self.norm(h)

    def forward(self, tokens, mask=None, cache=None, start=None):
        return self.output(self.hidden(tokens, mask, cache, start)).float()  # logits (B, T, vocab) in fp32

    def new_cache(self, batch_size, max_len):
        w = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len, w.device, w.dtype)


# ----------------------------------------------------------------------------- sampling

def left_pad(seqs, pad_id=0):
    """list of token lists -> tokens (B, T) and mask (B, T), padded on the left."""
    T = max(len(s) for s in seqs)
    tokens = torch.tensor([[pad_id] * (T - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return tokens, mask


def sample_top_p(probs, top_p, generator=None):
    # nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # mass before this token already >= top_p
    choice = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1, generator=generator)  # it renormalizes
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model, tokens, mask, max_new_tokens, temperature=1.0, top_p=1.0, eos_id=None, pad_id=0,
             generator=None, cuda_graph=False):
    """Sample continuations of left-padded prompts tokens/mask (B, T) with a KV cache: out (B, N), the response
    tokens (pad_id after EOS), and out_mask (B, N), 1 up to and including EOS. temperature 0 = greedy.
    cuda_graph: replay the decoding step as a CUDA graph (a CUDA device only)."""
    B, T = tokens.shape
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context "
                         f"of {model.cfg.max_seq_len} tokens")
    cache = model.new_cache(B, T + max_new_tokens)
    start = torch.zeros(1, dtype=torch.long, device=tokens.device)  # the next free cache slot
    logits = model.output(model.hidden(tokens, mask, cache, start)[:, -1]).float()  # (B, vocab)
    start += T
    # one decoding step: fixed shapes, and the token, the slot and the cache are its only inputs
    step = lambda token, start: model(token, None, cache, start)[:, -1]  # (B, 1), (1,) -> logits (B, vocab)
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    rows = torch.arange(B, device=tokens.device)  # the batch rows the cache holds
    out, out_mask = [], []
    for t in range(max_new_tokens):
        if temperature == 0:
            next_token = logits.argmax(-1)
        else:
            next_token = sample_top_p(F.log_softmax(logits / temperature, dim=-1).exp(), top_p, generator)
        out.append(next_token.masked_fill(done, pad_id))
        out_mask.append(~done)
        if eos_id is not None:
            done = done | (next_token == eos_id)
        if t == max_new_tokens - 1 or done.all():
            break
        if cuda_graph and t == 0:
            step = cudagraph.capture(step, next_token[:, None], start)
        live = ~done[rows]  # of the rows the cache holds, those still decoding; once a quarter finished, drop those
        if not cuda_graph and 4 * live.sum().item() <= 3 * len(rows):  # (a row's numbers never depend on the others')
            rows, cache.k, cache.v, cache.valid = rows[live], cache.k[:, live], cache.v[:, live], cache.valid[live]
        # held finished rows decode on (their samples masked out above); dropped ones keep their logits: same draws
        logits = logits.index_copy(0, rows, step(next_token[rows, None], start))
        start += 1
    return torch.stack(out, 1), torch.stack(out_mask, 1).long()


def last_index(mask):
    """Index of the last 1 in each row of a (B, T) mask (the EOS, or the last token of a cut-off response)."""
    assert (mask.sum(-1) > 0).all(), "every sequence needs at least one real token"
    return (mask.long() * torch.arange(1, mask.shape[-1] + 1, device=mask.device)).argmax(-1)  # (B,)


# ----------------------------------------------------------------------------- tokenizer and prompt template

class Tokenizer:
    def __init__(self, model_path):
        self.sp = formats.open_sentencepiece(model_path)  # a missing file or another kind of tokenizer is refused
        self.n_words, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()
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
    return (PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT).format(instruction=instruction, input=input)
