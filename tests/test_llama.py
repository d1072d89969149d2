"""llama.py and sample.py: exact LLaMA math, both checkpoint layouts, KV cache, left padding, sampling."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import checkpoints
import llama
from llama import Llama, LlamaConfig, generate, left_pad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = llama.PRESETS["tiny"]  # GQA: 4 query heads share 2 kv heads


def tiny(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return Llama(cfg).eval()


# -----------------------------------------------------------------------------
# an independent float64 LLaMA in Meta's own convention (complex rotary on interleaved pairs), from a
# Meta-named state dict; every other test of the layouts compares against it

def reference_logits(sd, cfg, tokens):
    sd = {k: v.double() for k, v in sd.items()}
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads
    B, T = tokens.shape
    norm = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).double() / hd)
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


def write_meta(path, meta_sd, cfg, n_shards=1):
    os.makedirs(path)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "multiple_of": 16, "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len}
    # tiny's hidden_dim 176 = Meta's rule: int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 16
    json.dump(params, open(os.path.join(path, "params.json"), "w"))
    for s in range(n_shards):  # model-parallel shards, split the way Meta splits them
        shard = {}
        for n, w in meta_sd.items():
            dim = checkpoints.META_SHARD_DIM.get(n.split(".")[-2])
            shard[n] = w if dim is None else w.chunk(n_shards, dim=dim)[s].clone()
        shard["rope.freqs"] = torch.zeros(cfg.dim // cfg.n_heads // 2)  # LLaMA-1 files carry this derived table
        torch.save(shard, os.path.join(path, f"consolidated.{s:02d}.pth"))


TOKENS = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["hf", "hf_sharded", "hf_bin", "meta", "meta_2_shards"])
def test_layouts_match_reference(tmp_path, layout):
    sd = random_meta_state(CFG)
    path = str(tmp_path / layout)
    if layout.startswith("hf"):
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
        write_meta(path, sd, CFG, n_shards=2 if layout == "meta_2_shards" else 1)
    model = checkpoints.load_llama(path)
    assert model.cfg == CFG
    ref = reference_logits(sd, CFG, TOKENS)
    torch.testing.assert_close(model(TOKENS).double(), ref, atol=1e-4, rtol=1e-4)  # fp32 vs float64


def test_save_hf_round_trip(tmp_path):
    model = tiny()
    checkpoints.save_llama(model, str(tmp_path / "ck"))
    again = checkpoints.load_llama(str(tmp_path / "ck"))
    assert torch.equal(model(TOKENS), again(TOKENS))


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


def test_greedy_generate_is_repeated_argmax():
    model = tiny()
    seqs = [TOKENS[0, :6].tolist(), TOKENS[1, :3].tolist()]
    tokens, mask = left_pad(seqs)
    out, out_mask = generate(model, tokens, mask, 10, temperature=0)
    out2, _ = generate(model, tokens, mask, 10, temperature=0)
    assert torch.equal(out, out2) and out_mask.all()
    for b, s in enumerate(seqs):
        seq = list(s)
        for t in range(10):
            logits = model(torch.tensor([seq]))[0, -1]
            assert out[b, t].item() == logits.argmax().item()
            seq.append(out[b, t].item())


def test_generate_through_a_recorded_step(monkeypatch):
    """generate(cuda_graph=True) on the CPU, llama.capture replaced by a stand-in with a CUDA graph's contract:
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
            m.setattr(llama, "capture", capture)
            replayed = run(True)
        assert all(torch.equal(a, b) for a, b in zip(eager, replayed)), temperature
    assert eager[1].sum(1).min() < eager[1].shape[1]  # a row stopped at EOS


def test_eos_stops_and_pads():
    model = tiny()
    tokens, mask = left_pad([TOKENS[0, :4].tolist(), TOKENS[1, :4].tolist()])
    out, _ = generate(model, tokens, mask, 6, temperature=0)
    eos = out[0, 2].item()  # pretend the third greedy token of row 0 is EOS
    out2, m2 = generate(model, tokens, mask, 6, temperature=0, eos_id=eos, pad_id=-1)
    first = (out[1] == eos).nonzero()
    stop1 = first[0, 0].item() + 1 if len(first) else 6
    assert m2[0].tolist() == [1, 1, 1] + [0] * (m2.shape[1] - 3)
    assert (out2[0, 3:] == -1).all()
    assert m2[1].sum().item() == min(stop1, m2.shape[1])


def test_sampling_respects_top_p_and_seed():
    model = tiny()
    tokens, mask = left_pad([TOKENS[0, :4].tolist()] * 64)
    gen = lambda seed, p: generate(model, tokens, mask, 1, temperature=1.0, top_p=p,
                                   generator=torch.Generator().manual_seed(seed))[0][:, 0]
    assert torch.equal(gen(0, 1.0), gen(0, 1.0))  # same seed, same samples
    probs = model(TOKENS[:1, :4])[0, -1].softmax(-1)
    assert (gen(1, 1e-6) == probs.argmax()).all()  # a tiny nucleus is greedy
    sorted_p, order = probs.sort(descending=True)
    nucleus = set(order[: int((sorted_p.cumsum(0) < 0.3).sum()) + 1].tolist())
    assert set(gen(2, 0.3).tolist()) <= nucleus


def test_golden_greedy_sequence():
    # a fixed-seed tiny model and prompt must keep producing exactly these tokens (N(0, 0.02) init)
    model = tiny(seed=1234)
    out, _ = generate(model, torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long), 12, temperature=0)
    assert out[0].tolist() == [149, 236, 74, 57, 2, 197, 213, 126, 137, 248, 183, 89]  # smallest top-2 gap 7e-4


def test_alpaca_template_exact():
    assert llama.alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:")
    assert llama.alpaca_prompt("Sort.", "b a") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSort.\n\n### Input:\n"
        "b a\n\n### Response:")


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


@pytest.mark.parametrize("case", ["no_dir", "no_weights", "bad_shape", "too_long", "bad_json", "bad_record"])
def test_bad_input_one_clear_line(checkpoint, tmp_path, case):
    args = ["--checkpoint", str(checkpoint), "--prompt", "the cat", "--max-new-tokens", "4"]
    expect = {"no_dir": "does not exist", "no_weights": "no weights", "bad_shape": "has shape",
              "too_long": "exceeds the context", "bad_json": "malformed JSON", "bad_record": "record 1"}[case]
    if case == "no_dir":
        args[1] = str(tmp_path / "nowhere")
    elif case in ("no_weights", "bad_shape"):
        d = tmp_path / case
        d.mkdir()
        (d / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
        cfg = json.loads((checkpoint / "config.json").read_text())
        if case == "bad_shape":
            cfg["intermediate_size"] += 8
            (d / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
        (d / "config.json").write_text(json.dumps(cfg))
        args[1] = str(d)
    elif case == "too_long":
        args[-1] = str(CFG.max_seq_len)
    else:
        f = tmp_path / "p.json"
        f.write_text("[\"ok\", " if case == "bad_json" else json.dumps(["ok", {"input": "no instruction"}]))
        args[2:4] = ["--prompts", str(f)]
    r = run_sample(*args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.stderr


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'llama-99b'; choose one of llama-7b"):
        llama.get_preset("llama-99b")
