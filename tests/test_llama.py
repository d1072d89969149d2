"""llama.py and sample.py: exact LLaMA math, both checkpoint layouts, KV cache, left padding, sampling."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import checkpoints
import llama
from llama import Llama, generate, left_pad
from support import cudagraph, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = llama.PRESETS["tiny"]  # GQA: 4 query heads share 2 kv heads


def tiny(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return Llama(cfg).eval()


# -----------------------------------------------------------------------------
# an independent float64 LLaMA in Meta's own convention (complex rotary on interleaved pairs), from a
# Meta-named state dict; every other test of the layouts compares against it

def reference_frequencies(hd, theta, kind="default", factor=1.0, low=1.0, high=4.0, original=8192):
    """theta_i = theta^(-2i/hd), one float64 at a time, then the published rescalings, written as their authors
    wrote them: linear = position interpolation (Chen et al. 2023: position t is read as t / factor), llama3 =
    Meta's apply_scaling for LLaMA 3.1 (a loop over frequencies with three cases)."""
    freqs = [theta ** (-2 * i / hd) for i in range(hd // 2)]
    if kind == "linear":
        freqs = [f / factor for f in freqs]  # (t / factor) * f = t * (f / factor)
    elif kind == "llama3":
        scaled = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < original / high:
                scaled.append(f)
            elif wavelen > original / low:
                scaled.append(f / factor)
            else:
                smooth = (original / wavelen - low) / (high - low)
                scaled.append((1 - smooth) * f / factor + smooth * f)
        freqs = scaled
    return torch.tensor(freqs, dtype=torch.float64)


def reference_logits(sd, cfg, tokens, freqs=None):
    sd = {k: v.double() for k, v in sd.items()}
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads
    B, T = tokens.shape
    norm = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w
    freqs = reference_frequencies(hd, cfg.rope_theta) if freqs is None else freqs
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T).double(), freqs))

    def rope(x):  # (B, T, heads, hd) as complex numbers (x_2i + i x_2i+1) times e^{i t theta_i}
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * rot[None, :, None, :]).reshape(x.shape)

    h = sd["tok_embeddings.weight"][tokens]
    for i in range(cfg.n_layers):
        p = lambda n: sd[f"layers.{i}.{n}.weight"]
        x = norm(h, p("attention_norm"))
        q = rope((x @ p("attention.wq").T).view(B, T, H, hd))
        k = rope((x @ p("attention.wk").T).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
        v = (x @ p("attention.wv").T).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / hd ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * hd)
        h = h + y @ p("attention.wo").T
        x = norm(h, p("ffn_norm"))
        h = h + (torch.nn.functional.silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


def random_meta_state(cfg, seed=0):
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Llama(cfg).named_parameters()}
    g = torch.Generator().manual_seed(seed)
    sd = {n: torch.randn(s, generator=g) * (1.0 if "norm" in n else 0.1) for n, s in shapes.items()}
    for n in sd:
        if "norm" in n:
            sd[n] = 1.0 + 0.1 * sd[n]
    return sd


def hf_permute(w, n_heads):
    # the Hugging Face conversion script's permutation of Meta's wq/wk rows (interleaved -> halves)
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def hf_state(meta_sd, cfg):
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for n, w in meta_sd.items():
        if n in names:
            out[names[n]] = w
            continue
        _, i, rest = n.split(".", 2)
        part = rest[: -len(".weight")]
        if part == "attention.wq":
            w = hf_permute(w, cfg.n_heads)
        elif part == "attention.wk":
            w = hf_permute(w, cfg.n_kv_heads or cfg.n_heads)
        out[f"model.layers.{i}.{parts[part]}.weight"] = w.contiguous()
    return out


def hf_config(cfg):
    return {"hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len}


# how Meta splits a model-parallel checkpoint (norms are replicated); LLaMA-3 splits tok_embeddings along the
# vocabulary (dim 0), LLaMA-1/2 along the model dimension (dim 1)
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}


def write_meta(path, meta_sd, cfg, n_shards=1, tok_dim=1, **params):
    os.makedirs(path)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "multiple_of": 16, "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
              **params}
    # tiny's hidden_dim 176 = Meta's rule: int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 16
    json.dump(params, open(os.path.join(path, "params.json"), "w"))
    split = {**META_SPLIT, "tok_embeddings": tok_dim}
    for s in range(n_shards):
        shard = {}
        for n, w in meta_sd.items():
            dim = split.get(n.split(".")[-2])
            shard[n] = w if dim is None else w.chunk(n_shards, dim=dim)[s].clone()
        shard["rope.freqs"] = torch.zeros(cfg.dim // cfg.n_heads // 2)  # LLaMA-1 files carry this derived table
        torch.save(shard, os.path.join(path, f"consolidated.{s:02d}.pth"))


def write_hf(path, meta_sd, cfg, **fields):
    os.makedirs(path)
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf_config(cfg), **fields},
              open(os.path.join(path, "config.json"), "w"))
    save_file(hf_state(meta_sd, cfg), os.path.join(path, "model.safetensors"))


TOKENS = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


# config.json fields a LLaMA may state explicitly with the values that keep LLaMA's math (transformers 5 writes
# all of them), and a Mistral without a sliding window, which is a LLaMA
EXPLICIT = {"hidden_act": "silu", "head_dim": 16, "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
            "pretraining_tp": 1, "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.44.0"}
MISTRAL = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None}


@pytest.mark.parametrize("layout", ["hf", "hf_sharded", "hf_bin", "hf_explicit", "hf_mistral", "meta", "meta_2_shards",
                                    "meta_2_shards_llama3"])
def test_layouts_match_reference(tmp_path, layout):
    sd = random_meta_state(CFG)
    path = str(tmp_path / layout)
    if layout in ("hf_explicit", "hf_mistral"):
        write_hf(path, sd, CFG, **(EXPLICIT if layout == "hf_explicit" else MISTRAL))
    elif layout.startswith("hf"):
        os.makedirs(path)
        json.dump(hf_config(CFG), open(os.path.join(path, "config.json"), "w"))
        hf = hf_state(sd, CFG)
        if layout == "hf":
            save_file(hf, os.path.join(path, "model.safetensors"))
        elif layout == "hf_bin":
            torch.save(hf, os.path.join(path, "pytorch_model.bin"))
        else:
            names = sorted(hf)
            halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
            for file, keys in halves.items():
                save_file({k: hf[k] for k in keys}, os.path.join(path, file))
            index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
            json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    else:
        write_meta(path, sd, CFG, n_shards=1 if layout == "meta" else 2, tok_dim=0 if layout.endswith("llama3") else 1)
    model = checkpoints.load_llama(path)
    assert model.cfg == CFG
    ref = reference_logits(sd, CFG, TOKENS)
    torch.testing.assert_close(model(TOKENS).double(), ref, atol=1e-4, rtol=1e-4)  # fp32 vs float64


def test_save_hf_round_trip(tmp_path):
    model = tiny()
    checkpoints.save_llama(model, str(tmp_path / "ck"))
    again = checkpoints.load_llama(str(tmp_path / "ck"))
    assert torch.equal(model(TOKENS), again(TOKENS))


# Rotary settings as each writer states them: (edits to config.json / params.json, None deleting a field; the
# reference's rotary; the rope_theta a loader that ignores the setting would use). tiny's head_dim is 16: eight
# frequencies, 500000^(-i/8) = wavelengths 6, 32, 167, 860, 4.5e3, 2.3e4, 1.2e5, 6e5 tokens, so llama3 with
# original_max_position_embeddings 64 keeps one, blends one and divides six; with 1024, keeps three, blends one.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
ROPE = {
    "hf4_linear": ({"rope_scaling": {"type": "linear", "factor": 4.0}}, dict(kind="linear", factor=4.0), 1e4),
    "hf4_llama3": ({"rope_theta": 5e5, "rope_scaling": LLAMA3}, dict(theta=5e5, kind="llama3", factor=8.0,
                                                                      original=64), 5e5),
    "hf5_default": ({"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                    dict(theta=5e5), 1e4),
    "hf5_linear": ({"rope_theta": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
                   dict(kind="linear", factor=2.0), 1e4),
    "hf5_llama3": ({"rope_theta": None, "rope_parameters": {**LLAMA3, "factor": 32.0, "rope_theta": 5e5,
                                                            "original_max_position_embeddings": 1024}},
                   dict(theta=5e5, kind="llama3", factor=32.0, original=1024), 1e4),
    "meta_use_scaled_rope": ({"rope_theta": 5e5, "use_scaled_rope": True},  # factor 8, low 1, high 4, 8192
                             dict(theta=5e5, kind="llama3", factor=8.0, original=8192), 5e5),
}
LONG = torch.randint(0, CFG.vocab_size, (2, 200), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("case", list(ROPE))
def test_rope_scaling_matches_reference(tmp_path, case):
    edits, rope, ignored_theta = ROPE[case]
    sd, path = random_meta_state(CFG), str(tmp_path / case)
    if case.startswith("meta"):
        write_meta(path, sd, CFG, **edits)
    else:
        write_hf(path, sd, CFG, **edits)
        cfg = json.load(open(os.path.join(path, "config.json")))
        json.dump({k: v for k, v in cfg.items() if v is not None}, open(os.path.join(path, "config.json"), "w"))
    model = checkpoints.load_llama(path)
    freqs = reference_frequencies(16, **{"theta": 1e4, **rope})
    ref = reference_logits(sd, CFG, LONG, freqs)
    torch.testing.assert_close(model(LONG).double(), ref, atol=1e-4, rtol=1e-4)  # fp32 vs float64, 200 positions
    # a left-padded batch of prefixes: each row as if alone (causal: a prefix's logits are the first rows of ref)
    rows = [(0, 200), (1, 131), (0, 40)]
    tokens, mask = left_pad([LONG[b, :n].tolist() for b, n in rows])
    batched = model(tokens, mask).double()
    for i, (b, n) in enumerate(rows):
        torch.testing.assert_close(batched[i, -n:], ref[b, :n], atol=1e-4, rtol=1e-4)
    # control: the setting matters here, 100 x the tolerance above
    model.cfg = dataclasses.replace(model.cfg, rope_theta=ignored_theta, rope_scaling=None)
    assert (model(LONG).double() - ref).abs().max() > 1e-2
    # and it survives a save in our layout
    checkpoints.save_llama(checkpoints.load_llama(path), str(tmp_path / "saved"))
    assert checkpoints.load_llama(str(tmp_path / "saved")).cfg == checkpoints.load_llama(path).cfg


def test_rmsnorm_and_rotary_direct_formulas():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    n = llama.RMSNorm(64, 1e-6).double()
    torch.nn.init.normal_(n.weight)
    direct = torch.stack([torch.stack([v / (sum(u * u for u in v) / 64 + 1e-6).sqrt() for v in row]) for row in x])
    torch.testing.assert_close(n(x), direct * n.weight, atol=1e-12, rtol=1e-12)

    hd, pos = 8, torch.tensor([[0, 3, 7]])
    q = torch.randn(1, 3, 1, hd, dtype=torch.float64)
    cos, sin = llama.rotary(pos, hd, 10000.0)
    got = llama.apply_rotary(q, cos.double(), sin.double())
    for t in range(3):  # pair (i, i + hd/2) turns by angle pos * theta^(-2i/hd)
        for i in range(hd // 2):
            a = pos[0, t].item() * 10000.0 ** (-2 * i / hd)
            x1, x2 = q[0, t, 0, i].item(), q[0, t, 0, i + hd // 2].item()
            assert abs(got[0, t, 0, i].item() - (x1 * torch.tensor(a).cos() - x2 * torch.tensor(a).sin()).item()) < 1e-6
            assert abs(got[0, t, 0, i + hd // 2].item() - (x2 * torch.tensor(a).cos() + x1 * torch.tensor(a).sin()).item()) < 1e-6


def test_7b_parameter_count():
    with torch.device("meta"):
        model = Llama(llama.PRESETS["llama-7b"])
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616


def decode(model, tokens, mask, nxt, L):
    """Prefill a left-padded batch into a cache of L slots, then feed nxt (B, n) one token at a time through
    generate's decoding step; returns the logits (B, T + n, V) of every position."""
    cache = model.new_cache(tokens.shape[0], L)
    g = torch.Generator().manual_seed(0)
    cache.k.normal_(0, 1e3, generator=g)  # stale values in the slots not yet written must not matter
    cache.v.normal_(0, 1e3, generator=g)
    start = torch.zeros(1, dtype=torch.long)
    parts = [model(tokens, mask, cache, start)]
    for t in range(nxt.shape[1]):
        start += tokens.shape[1] if t == 0 else 1
        parts.append(model(nxt[:, t:t + 1], None, cache, start))  # (B, 1, V), the same shapes at every t
    return torch.cat(parts, 1)


def test_kv_cache_equals_full_forward():
    model = tiny()
    full = model(TOKENS)
    torch.testing.assert_close(decode(model, TOKENS[:, :5], None, TOKENS[:, 5:], 16), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(decode(model, TOKENS[:, :1], None, TOKENS[:, 1:], 12), full, atol=1e-5, rtol=0)


def test_left_padding_gives_each_sequence_alone():
    model = tiny()
    seqs = [TOKENS[0, :12].tolist(), TOKENS[1, :7].tolist(), TOKENS[0, 3:6].tolist()]
    tokens, mask = left_pad(seqs, pad_id=0)
    batched = model(tokens, mask)
    for b, s in enumerate(seqs):
        alone = model(torch.tensor([s]))[0]
        torch.testing.assert_close(batched[b, -len(s):], alone, atol=1e-5, rtol=0)
    # and incrementally through the cache, starting from the padded prompt: the same logits as one full
    # forward of the padded batch, and as each sequence alone
    nxt = torch.tensor([[5, 9], [6, 10], [7, 11]])
    step = decode(model, tokens, mask, nxt, 20)
    full = model(torch.cat([tokens, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1))
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(step[b, -len(s) - 2:], model(torch.tensor([s + nxt[b].tolist()]))[0],
                                   atol=1e-5, rtol=0)


def test_generate_equals_greedy_full_forward_with_eos_mid_batch():
    """The static cache gives the tokens of repeated argmax over full forwards of the left-padded batch; a
    row that emits EOS stops there while the others go on."""
    model = tiny()
    seqs = [TOKENS[0, :9].tolist(), TOKENS[1, :2].tolist(), TOKENS[1, 4:9].tolist()]
    tokens, mask = left_pad(seqs)
    out, _ = generate(model, tokens, mask, 10, temperature=0)
    eos = out[1, 3].item()  # the fourth greedy token of row 1 becomes EOS
    out, out_mask = generate(model, tokens, mask, 10, temperature=0, eos_id=eos, pad_id=-1)
    seq, seq_mask, expect = tokens, mask, []
    for t in range(10):  # the batch through the whole model at every step, no cache
        nxt = model(seq, seq_mask)[:, -1].argmax(-1)
        expect.append(nxt)
        seq, seq_mask = torch.cat([seq, nxt[:, None]], 1), torch.cat([seq_mask, torch.ones(3, 1, dtype=torch.long)], 1)
    expect = torch.stack(expect, 1)
    n = out_mask.sum(1)
    assert n[1] <= 4 and n.max() > n[1], n  # EOS mid-batch: row 1 stopped, another went on
    for b in range(3):
        assert out[b, :n[b]].tolist() == expect[b, :n[b]].tolist(), b
        assert (out[b, n[b]:] == -1).all() and (n[b] == out.shape[1] or out[b, n[b] - 1] == eos)
        k = int(n[b])
        assert out_mask[b].tolist() == [1] * k + [0] * (out.shape[1] - k), b  # a prefix of ones
        assert eos not in out[b, :n[b] - 1].tolist(), b  # stopped at the first EOS


def test_generate_through_a_recorded_step(monkeypatch):
    """generate(cuda_graph=True) on the CPU, cudagraph.capture replaced by a stand-in with a CUDA graph's contract:
    the step runs once on copies of its first inputs when recorded, then only on those recorded tensors, refilled
    by copy, into one output tensor that each replay overwrites. Same tokens as eager decoding, greedy and
    sampled with one seed, with a row stopping at EOS mid-batch."""
    def capture(fn, *args):
        inputs = [a.clone() for a in args]
        output = fn(*inputs).clone()  # the warm-up run: it writes the first step's cache slot once already

        def replay(*args):
            for x, a in zip(inputs, args):
                x.copy_(a)
            return output.copy_(fn(*inputs))
        return replay
    model = tiny()
    tokens, mask = left_pad([TOKENS[0, :9].tolist(), TOKENS[1, :2].tolist(), TOKENS[1, 4:9].tolist()])
    eos = generate(model, tokens, mask, 10, temperature=0)[0][1, 3].item()
    for temperature in (0.0, 1.0):
        run = lambda graph: generate(model, tokens, mask, 10, temperature=temperature, eos_id=eos, pad_id=-1,
                                     generator=torch.Generator().manual_seed(0), cuda_graph=graph)
        eager = run(False)
        with monkeypatch.context() as m:
            m.setattr(cudagraph, "capture", capture)
            replayed = run(True)
        assert all(torch.equal(a, b) for a, b in zip(eager, replayed)), temperature
    assert eager[1].sum(1).min() < eager[1].shape[1]  # a row stopped at EOS


def test_dropping_finished_rows_changes_no_token():
    """generate stops computing rows that emitted EOS once a quarter of the held rows have: every row's sampled
    tokens up to its EOS are those of the same seed's run in which no row stops (eos_id None), so neither the
    logits of the rows still decoding nor the random numbers each row draws depend on which rows are held."""
    model = tiny()
    tokens, mask = left_pad([TOKENS[i % 2, j:j + 3 + i].tolist() for i, j in enumerate(range(8))])  # (8, P)
    run = lambda eos: generate(model, tokens, mask, 16, temperature=1.0, eos_id=eos,
                               generator=torch.Generator().manual_seed(5))
    free, _ = run(None)  # (8, 16): every row decodes 16 tokens
    eos = torch.mode(free[:, :8].flatten()).values.item()  # the token most often drawn early stops rows early
    out, out_mask = run(eos)
    n = out_mask.sum(1)
    assert (n < n.max()).sum() >= 2 and len(set(n.tolist())) > 2, n  # rows dropped (a quarter of 8), at several lengths
    for b in range(8):
        assert out[b, :n[b]].tolist() == free[b, :n[b]].tolist(), b


def test_sampling_respects_top_p_and_seed():
    model = tiny()
    tokens, mask = left_pad([TOKENS[0, :4].tolist()] * 64)
    gen = lambda seed, p: generate(model, tokens, mask, 1, temperature=1.0, top_p=p,
                                   generator=torch.Generator().manual_seed(seed))[0][:, 0]
    assert torch.equal(gen(0, 1.0), gen(0, 1.0))  # same seed, same samples
    probs = model(TOKENS[:1, :4])[0, -1].softmax(-1)
    assert (gen(1, 1e-6) == probs.argmax()).all()  # a tiny nucleus is greedy
    sorted_p, order = probs.sort(descending=True)
    nucleus = lambda p: set(order[: int((sorted_p.cumsum(0) < p).sum()) + 1].tolist())
    # top-p 0.02: a nucleus of 4 near-equally likely tokens; 64 draws hit every one (a miss has probability
    # < 4 x 0.76^64 = 1e-7), so a greedy sampler fails; and none outside it
    assert len(nucleus(0.02)) == 4 and set(gen(2, 0.02).tolist()) == nucleus(0.02)
    # top-p 0.3 (63 tokens): many distinct draws, all inside; without top-p most of 64 draws fall outside
    drawn = set(gen(3, 0.3).tolist())
    assert drawn <= nucleus(0.3) and len(drawn) >= 20 and len(drawn - {probs.argmax().item()}) >= 19
    assert len(set(gen(3, 1.0).tolist()) - nucleus(0.3)) >= 10


@pytest.mark.parametrize("top_p", [0.7, 1.0])
def test_top_p_draws_the_renormalized_nucleus(top_p):
    """Each token in the nucleus (the most likely tokens until their mass reaches top_p) is drawn with its
    probability renormalized over the nucleus, within 5 standard errors; no token outside it is ever drawn.
    A greedy sampler, or one that ignores top_p, fails."""
    probs = torch.tensor([0.05, 0.4, 0.01, 0.15, 0.25, 0.03, 0.1, 0.01])
    n = 20000
    draws = llama.sample_top_p(probs.expand(n, -1), top_p, torch.Generator().manual_seed(0))    # (n,)
    freq = torch.bincount(draws, minlength=8).double() / n
    nucleus = [1, 4, 3] if top_p == 0.7 else list(range(8))  # 0.4 + 0.25 < 0.7 <= 0.4 + 0.25 + 0.15
    expected = torch.zeros(8, dtype=torch.float64)
    expected[nucleus] = probs[nucleus].double() / probs[nucleus].double().sum()
    se = (expected * (1 - expected) / n).sqrt()
    inside = expected > 0
    assert ((freq - expected).abs()[inside] <= 5 * se[inside]).all(), (freq, expected)
    assert (freq[~inside] == 0).all()


def test_golden_greedy_sequence():
    # a fixed-seed tiny model and prompt must keep producing exactly these tokens (N(0, 0.02) init)
    model = tiny(seed=1234)
    out, _ = generate(model, torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long), 12, temperature=0)
    assert out[0].tolist() == [149, 236, 74, 57, 2, 197, 213, 126, 137, 248, 183, 89]  # smallest top-2 gap 7e-4


# Stanford Alpaca's PROMPT_DICT as its train.py writes it (github.com/tatsu-lab/stanford_alpaca), typed here
# independently of llama.py, with its rule: the input variant when the example's input is not empty
ALPACA_PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def test_alpaca_template_exact():
    examples = [{"instruction": "Say hi.", "input": ""}, {"instruction": "Sort.", "input": "b a"},
                {"instruction": "Two lines:\nkeep {braces}.", "input": "  spaced\n"}, {"instruction": "x", "input": "0"}]
    for ex in examples:
        key = "prompt_input" if ex["input"] != "" else "prompt_no_input"
        assert llama.alpaca_prompt(ex["instruction"], ex["input"]) == ALPACA_PROMPT_DICT[key].format_map(ex), ex
    assert llama.alpaca_prompt("Say hi.") == ALPACA_PROMPT_DICT["prompt_no_input"].format(instruction="Say hi.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny HF-layout checkpoint with a sentencepiece tokenizer trained on the spot."""
    import sentencepiece as spm
    path = tmp_path_factory.mktemp("ck")
    text = path / "text.txt"
    words = "the cat sat on a mat while dogs ran far away from home and we sing songs of red blue green".split()
    g = torch.Generator().manual_seed(0)
    text.write_text("\n".join(" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g))
                              for _ in range(300)) + "\n" + llama.alpaca_prompt("x", "y"))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path / "tokenizer"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)  # 256 byte pieces + 64
    checkpoints.save_llama(tiny(cfg=dataclasses.replace(CFG, vocab_size=320)), str(path))
    return path


def test_tokenizer_round_trip(checkpoint):
    tok = llama.Tokenizer(str(checkpoint / "tokenizer.model"))
    ids = tok.encode("the cat sat", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "the cat sat"
    assert tok.decode(tok.encode("émoji ✓ unseen", bos=False)) == "émoji ✓ unseen"  # byte fallback


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_sample_script_writes_alpacaeval_json(checkpoint, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["the cat", {"instruction": "sing", "input": "red blue"}]))
    out = tmp_path / "out.json"
    r = run_sample("--checkpoint", str(checkpoint), "--prompts", str(prompts), "--max-new-tokens", "8",
                   "--temperature", "0", "--out", str(out), "--generator", "tiny")
    assert r.returncode == 0, r.stderr
    records = json.loads(out.read_text())
    assert [set(x) for x in records] == [{"instruction", "input", "output", "generator"}] * 2
    assert records[1]["input"] == "red blue" and records[0]["generator"] == "tiny"


def prompts_file(text):
    def make(ck, args, tmp):
        (tmp / "p.json").write_bytes(text.encode() if isinstance(text, str) else text)
        return args[:2] + ["--prompts", str(tmp / "p.json")] + args[4:]
    return make


def with_flags(*flags):
    return lambda ck, args, tmp: args + list(flags)


# case -> (how the good command is spoiled, what the one line must say)
SAMPLE_BAD = {
    "no_dir": (lambda ck, a, t: ["--checkpoint", str(t / "nowhere")] + a[2:], "--checkpoint must be a checkpoint directory"),
    "too_long": (with_flags("--max-new-tokens", str(CFG.max_seq_len)), "exceeds the context"),
    "bad_record": (prompts_file(json.dumps(["ok", {"input": "no instruction"}])), "record 1"),
    "max_new_tokens_0": (with_flags("--max-new-tokens", "0"), "--max-new-tokens must be at least 1, got 0"),
    "temperature": (with_flags("--temperature", "1e-320"), "--temperature must be 0 (greedy) or a finite number >= 0.001"),
    "top_p_0": (with_flags("--top-p", "0"), "--top-p must be in (0, 1]"),
    "batch_size": (with_flags("--batch-size", "0"), "--batch-size must be at least 1"),
    "merge_alone": (with_flags("--merge"), "--merge must be given with --adapter"),
    "out_is_a_dir": (lambda ck, a, t: a + ["--out", str(t)], "--out must be a file, not a directory"),
    "out_in_no_dir": (lambda ck, a, t: a + ["--out", str(t / "none" / "x.json")], "--out must be in an existing directory"),
    "seed_overflow": (with_flags("--seed", str(10 ** 20)), "--seed must be in [0, 2**63), got 100000000000000000000"),
    "no_cuda": (with_flags("--device", "cuda"), "this machine has no CUDA device"),
    "bad_device": (with_flags("--device", "mps"), "--device must be cpu, cuda or cuda:N, got mps"),
}


@pytest.mark.parametrize("case", list(SAMPLE_BAD))
def test_sample_bad_input_ends_in_one_line(checkpoint, tmp_path, case, capsys):
    import sample
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spoil, message = SAMPLE_BAD[case]
    args = spoil(checkpoint, ["--checkpoint", str(checkpoint), "--prompt", "the cat", "--max-new-tokens", "4"],
                 tmp_path)
    assert sample.cli(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")], "a temporary file was left behind"


def test_sample_bad_input_on_the_command_line(checkpoint):
    r = run_sample("--checkpoint", str(checkpoint), "--prompt", "the cat", "--top-p", "2")
    assert r.returncode == 1 and r.stderr == "error: --top-p must be in (0, 1], got 2.0\n", r.stderr


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'llama-99b'; choose one of llama-7b"):
        plan.get_preset("llama-99b")
