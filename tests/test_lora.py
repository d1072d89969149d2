"""Numerical oracles for lora.py: Eq. 1 against float64, exact invariants, PEFT files, 7B parameter counts."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoints import hf_to_meta_name, load_adapter, load_llama, peft_key, save_adapter, save_llama
from llama import PRESETS, Llama
from lora import LoRALinear, add_lora, count_parameters, lora_disabled, lora_layers, merge_lora, unmerge_lora

EPS32 = torch.finfo(torch.float32).eps


def make_layer(d_in=48, d_out=40, rank=4, alpha=16, dropout=0.0, seed=0, random_B=True):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), rank, alpha, dropout)
    if random_B:  # B = 0 at init; make the update non-trivial
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    return layer


def fp32_bound(x, W_eff):
    # worst-case rounding of an fp32 dot product of length n: |err| <= n * eps * sum |x_j| |W_ij|
    # (Higham's gamma_n), with 3 more n's of slack for the separate LoRA path (2 matmuls + add).
    n = x.shape[-1]
    return 4 * n * EPS32 * (x.abs().double() @ W_eff.abs().T.double())


# ----------------------------------------------------------------------------- LoRALinear alone

def test_init_shapes_and_kaiming():
    layer = make_layer(d_in=256, d_out=40, rank=8, random_B=False)
    assert layer.lora_A.shape == (8, 256) and layer.lora_B.shape == (40, 8)
    assert layer.scale == 16 / 8
    assert torch.count_nonzero(layer.lora_B) == 0
    # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)); the variance is 1/(3 in)
    bound = 1 / math.sqrt(256)
    assert layer.lora_A.abs().max() <= bound
    var = layer.lora_A.var().item()
    # 2048 samples of a uniform: std error of the sample variance = sqrt(4/45) sigma^2 / sqrt(n) ~ 0.7%
    assert abs(var - 1 / (3 * 256)) < 5 * math.sqrt(4 / 45) / math.sqrt(2048) / (3 * 256)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_B_zero_equals_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=False)
    x = torch.randn(3, 5, 48)
    ref = base(x)
    layer = LoRALinear(base, 4, 16, dropout=0.5).train()  # even with dropout active
    assert torch.equal(layer(x), ref)


def test_update_is_scaled_BA_against_float64():
    layer = make_layer(alpha=24, rank=4)  # scale 6
    x = torch.randn(7, 48)
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    W_eff = W + (24 / 4) * B @ A  # Eq. 1, dense in float64
    want = x.double() @ W_eff.T
    got = layer(x).double()
    assert (got - want).abs().le(fp32_bound(x, W_eff)).all()
    # rank-4 fp32 dot products times the scale: |err| <= (4 + 1) * eps * 6 |B| |A|
    err = (layer.delta_weight().double() - 6 * B @ A).abs()
    assert err.le(5 * EPS32 * 6 * B.abs() @ A.abs()).all()
    # the bound is tight enough to catch a wrong scale: alpha instead of alpha/rank
    wrong = x.double() @ (W + 24 * B @ A).T
    assert not (got - wrong).abs().le(fp32_bound(x, W_eff)).all()


def test_merge_matches_unmerged_and_unmerge_restores_W():
    layer = make_layer()
    x = torch.randn(6, 48)
    W0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), y, atol=1e-5, rtol=0)  # fp32, 1e-5 (values are O(1))
    layer.unmerge()
    # W + d - d in fp32 rounds twice: |err| <= eps * (|W| + |d|) elementwise (one ulp of the sum)
    d = layer.delta_weight().detach()
    assert (layer.weight - W0).abs().le(EPS32 * (W0.abs() + d.abs())).all()
    assert torch.allclose(layer(x), y, atol=1e-5, rtol=0)
    with pytest.raises(AssertionError):
        layer.unmerge()


def test_dropout_only_in_train_mode_and_only_on_lora_path():
    p = 0.5
    layer = make_layer(dropout=p)
    x = torch.randn(4, 48)
    W, A, B, s = layer.weight, layer.lora_A, layer.lora_B, layer.scale
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(x), layer(x))  # deterministic in eval
        no_drop = x @ W.T + s * (x @ A.T) @ B.T
        assert torch.allclose(layer(x), no_drop, atol=1e-6)
        layer.train()
        torch.manual_seed(123)
        y = layer(x)
        torch.manual_seed(123)
        xd = F.dropout(x, p, training=True)  # the same mask: dropout is the first RNG draw of forward
        assert not torch.equal(xd, x)
        assert torch.allclose(y, x @ W.T + s * (xd @ A.T) @ B.T, atol=1e-6)  # base path sees all of x
        assert not torch.allclose(y, no_drop, atol=1e-3)


def test_disabled_flag_and_bf16_base_with_fp32_adapters():
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    layer = LoRALinear(base, 4, 8, 0.0, lora_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16  # the LoRA path runs in the input dtype
    y.float().pow(2).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert layer.weight.grad is None
    layer.disabled = True
    assert torch.equal(layer(x), F.linear(x, base.weight))


# ----------------------------------------------------------------------------- on a Llama

TINY = PRESETS["tiny"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return Llama(TINY).eval()


def tokens(seed=1, B=2, T=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (B, T), generator=g)


def randomize_B(model, std=0.05, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def test_add_lora_B_zero_equals_base_and_counts():
    model, x = tiny(), tokens()
    base_logits = model(x)
    total0 = count_parameters(model)[1]
    params = add_lora(model, rank=4, alpha=16, dropout=0.1)
    # independent count: rank * (in + out) for wq, wk, wv, wo of every layer (wk, wv are GQA-narrow)
    hd = TINY.dim // TINY.n_heads
    kv = TINY.n_kv_heads * hd
    want = TINY.n_layers * 4 * ((TINY.dim + TINY.dim) + 2 * (TINY.dim + kv) + (TINY.dim + TINY.dim))
    assert sum(p.numel() for p in params) == want
    assert count_parameters(model) == (want, total0 + want)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    assert not any(m.training for _, _, m in lora_layers(model)), "injected layers follow the model's mode"
    assert torch.equal(model(x), base_logits)  # B = 0: exactly the base model (eval: no dropout)
    model.train()
    assert torch.equal(model(x), base_logits)  # B = 0: dropout on the LoRA path changes nothing either
    mlp = tiny()
    add_lora(mlp, rank=2, targets=("wq", "wv", "w1", "w2", "w3"))
    assert sorted({t for _, t, _ in lora_layers(mlp)}) == ["w1", "w2", "w3", "wq", "wv"]
    with pytest.raises(ValueError, match="at most once"):
        add_lora(tiny(), targets=("q_proj",))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


def test_optimizer_step_changes_only_A_and_B():
    model, x = tiny(), tokens()
    params = add_lora(model, rank=4, alpha=16, dropout=0.1)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # step 1: grad A = 0 because B = 0; step 2 moves A too
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), x[:, 1:].reshape(-1))
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():  # a plain SGD step (any torch.optim class first imports torch._dynamo, which is slow)
            for p in params:
                p -= 0.5 * p.grad
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert p.grad is None, f"{n} got a gradient"
            assert torch.equal(p, before[n]), f"{n} changed"


def test_activation_checkpointing_gives_the_same_lora_gradients():
    """Recomputing each block in backward (with dropout on: its masks are replayed from the saved RNG state)
    gives the loss and every LoRA gradient of the plain forward + backward, bit for bit, on a left-padded batch."""
    x, mask = tokens(B=3), torch.tensor([[0] * 4 + [1] * 8, [1] * 12, [0] * 9 + [1] * 3])
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        params = add_lora(model, rank=4, alpha=16, dropout=0.3)
        randomize_B(model)
        model.train()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(5)  # the same dropout masks in both runs
        loss = model(x, mask).logsumexp(-1).mul(mask).sum()
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in params])
    assert all(g is not None and torch.equal(a, g) for a, g in zip(*grads))
    assert all(g.abs().sum() > 0 for g in grads[1][1:])


def test_adapters_off_equals_base_and_eval_never_merges():
    model, x = tiny(), tokens()
    base_logits = model(x)
    add_lora(model, rank=4, alpha=16, dropout=0.1)
    randomize_B(model)
    lora_logits = model(x)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    with lora_disabled(model):
        assert torch.equal(model(x), base_logits)
    assert torch.equal(model(x), lora_logits)  # flags restored on exit
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.eval()
    assert not any(m.merged for _, _, m in lora_layers(model))
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), lora_logits)


def test_model_merge_unmerge():
    model, x = tiny(), tokens()
    add_lora(model, rank=4, alpha=16)
    randomize_B(model)
    logits = model(x)
    W0 = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert torch.allclose(model(x), logits, atol=1e-5, rtol=0)  # fp32; logits are O(0.1)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lora_disabled(model):
            pass
    unmerge_lora(model)
    for k, v in model.state_dict().items():  # one rounding of W + dW: within an ulp of |W| + |dW| ~ 0.1
        assert torch.allclose(v, W0[k], atol=0.5 * EPS32, rtol=2 * EPS32), k
    assert torch.allclose(model(x), logits, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    model, x = tiny(), tokens()
    base_dir = tmp_path / "base"
    save_llama(model, str(base_dir))
    add_lora(model, rank=4, alpha=16, dropout=0.1)
    randomize_B(model)
    want = model(x)
    save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path="tiny")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    # 1) into a fresh base model loaded from the same base weights: LoRA layers get injected
    fresh = load_llama(str(base_dir)).eval()
    load_adapter(fresh, str(tmp_path / "adapter"))
    assert torch.equal(fresh(x), want)
    assert count_parameters(fresh) == count_parameters(model)
    assert {m.dropout.p for _, _, m in lora_layers(fresh)} == {0.1}
    # 2) into a model that already has (different) LoRA layers of the same shape
    other = tiny()
    add_lora(other, rank=4, alpha=16, dropout=0.1)
    load_adapter(other, str(tmp_path / "adapter"))
    assert torch.equal(other(x), want)


def test_peft_file_layout(tmp_path):
    model = tiny()
    add_lora(model, rank=4, alpha=16, dropout=0.1, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    save_adapter(model, str(tmp_path), base_model_name_or_path="org/tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["bias"]) \
        == ("LORA", "CAUSAL_LM", 4, 16, 0.1, "none")
    assert cfg["base_model_name_or_path"] == "org/tiny"
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(sd) == TINY.n_layers * 7 * 2 and not any("default" in k for k in sd)
    p = "base_model.model.model.layers.1"
    hd = TINY.dim // TINY.n_heads
    assert sd[f"{p}.self_attn.q_proj.lora_A.weight"].shape == (4, TINY.dim)
    assert sd[f"{p}.self_attn.k_proj.lora_B.weight"].shape == (TINY.n_kv_heads * hd, 4)
    assert sd[f"{p}.mlp.gate_proj.lora_B.weight"].shape == (TINY.hidden_dim, 4)
    assert sd[f"{p}.mlp.down_proj.lora_A.weight"].shape == (4, TINY.hidden_dim)
    m = model.layers[1].feed_forward
    assert torch.equal(sd[f"{p}.mlp.gate_proj.lora_A.weight"], m.w1.lora_A)
    assert torch.equal(sd[f"{p}.mlp.up_proj.lora_A.weight"], m.w3.lora_A)
    assert set(sd) == {peft_key(i, t, ab) for i, t, _ in lora_layers(model) for ab in "AB"}


def peft_adapter(tmp_path, r=2, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
                 key_fmt="base_model.model.model.layers.{i}.{mod}.lora_{ab}.weight", seed=3):
    """An adapter as PEFT would write it, built only from the HF names and shapes (not from lora.py)."""
    shapes = {"q_proj": ("self_attn", TINY.dim, TINY.dim), "v_proj": ("self_attn", TINY.dim, TINY.dim // 2),
              "gate_proj": ("mlp", TINY.dim, TINY.hidden_dim), "up_proj": ("mlp", TINY.dim, TINY.hidden_dim),
              "down_proj": ("mlp", TINY.hidden_dim, TINY.dim)}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(TINY.n_layers):
        for t in targets:
            block, d_in, d_out = shapes[t]
            sd[key_fmt.format(i=i, mod=f"{block}.{t}", ab="A")] = torch.randn(r, d_in, generator=g) * 0.1
            sd[key_fmt.format(i=i, mod=f"{block}.{t}", ab="B")] = torch.randn(d_out, r, generator=g) * 0.1
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
           "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None}
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    return sd, cfg


def test_peft_adapter_gives_merged_weight_logits(tmp_path):
    """A PEFT adapter means W_hf <- W_hf + (alpha/r) B A on each named module (PEFT's merge). Do that merge
    in float64 on the state dict through llama.py's own HF name table, and compare with load_adapter."""
    sd, cfg = peft_adapter(tmp_path)
    x = tokens()
    merged = tiny()
    state = merged.state_dict()
    for k in sd:
        if ".lora_A." in k:
            hf = k.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            name = hf_to_meta_name(hf)
            B = sd[k.replace(".lora_A.", ".lora_B.")]
            state[name] = (state[name].double() + (8 / 2) * B.double() @ sd[k].double()).float()
    merged.load_state_dict(state)
    model = tiny()
    load_adapter(model, str(tmp_path))
    assert sorted({t for _, t, _ in lora_layers(model)}) == ["w1", "w2", "w3", "wq", "wv"]
    # same math, two orders of fp32 rounding; logits are O(0.1): 1e-5 absolute is ~100 ulps of slack
    assert torch.allclose(model(x), merged(x), atol=1e-5, rtol=0)
    # keys that keep PEFT's adapter name, and the older .bin format, load the same
    d2 = tmp_path / "named"
    peft_adapter(d2, key_fmt="base_model.model.model.layers.{i}.{mod}.lora_{ab}.default.weight")
    (d2 / "adapter_model.safetensors").rename(d2 / "x")
    torch.save(load_file(str(d2 / "x")), str(d2 / "adapter_model.bin"))
    m2 = tiny()
    load_adapter(m2, str(d2))
    assert torch.equal(m2(x), model(x))


def test_peft_config_as_peft_writes_it(tmp_path):
    """PEFT writes every field of its LoraConfig, most of them unset; with plain-LoRA values they load, and so
    does a field we do not know that is unset (the refusals are in test_refusals.py)."""
    sd, cfg = peft_adapter(tmp_path / "plain")
    cfg.update({"alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
                "base_model_name_or_path": "org/tiny", "corda_config": None, "ensure_weight_tying": False,
                "eva_config": None, "exclude_modules": None, "inference_mode": True, "init_lora_weights": "gaussian",
                "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
                "lora_bias": False, "megatron_config": None, "megatron_core": "megatron.core", "peft_version": "0.21.0",
                "qalora_group_size": 16, "rank_pattern": {}, "revision": None, "target_parameters": None,
                "trainable_token_indices": None, "use_dora": False, "use_qalora": False, "use_rslora": False,
                "a_future_field": None, "another_future_field": []})
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "full" / "adapter_model.safetensors"))
    x, plain, full = tokens(), tiny(), tiny()
    load_adapter(plain, str(tmp_path / "plain"))
    load_adapter(full, str(tmp_path / "full"))
    assert torch.equal(plain(x), full(x))


def test_7b_preset_on_meta_device_counts():
    from reward import ValueModel
    with torch.device("meta"):
        policy = Llama(PRESETS["llama-7b"])
        assert count_parameters(policy) == (6_738_415_616, 6_738_415_616)
        p = add_lora(policy, rank=8, alpha=64, dropout=0.1)
        value = ValueModel(Llama(PRESETS["llama-7b"]), rank=8, alpha=64, dropout=0.1)
    assert all(t.is_meta for t in p)
    assert sum(t.numel() for t in p) == 8_388_608  # 32 layers x 4 x 8 x (4096 + 4096)
    assert count_parameters(policy) == (8_388_608, 6_738_415_616 + 8_388_608)
    # the value model: its own LoRA + a scalar head of 4096 + 1: 16,781,313 trainable in all, the paper's 16.7M
    assert count_parameters(value) == (8_388_608 + 4097, 6_738_415_616 + 8_388_608 + 4097)


def test_load_into_other_lora_layers_and_save_without_lora_are_refused(tmp_path):
    """Errors of use, not of files (those are in test_refusals.py)."""
    peft_adapter(tmp_path / "good")
    model = tiny()
    add_lora(model, rank=4)
    with pytest.raises(ValueError, match="r=2.*model's LoRA layers have r=\\{4\\}"):
        load_adapter(model, str(tmp_path / "good"))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny(), str(tmp_path / "none"))


# ----------------------------------------------------------------------------- sample.py --adapter

@pytest.mark.slow
def test_sample_script_with_adapter(tmp_path):
    """Greedy samples with the adapter applied unmerged and merged are the same (the errors of a bad adapter
    dir are tested in-process above; sample.py prints them as one line)."""
    import sentencepiece as spm
    words = "the cat sat on a mat while dogs ran far away from home and we sing songs".split()
    g = torch.Generator().manual_seed(0)
    (tmp_path / "text.txt").write_text("\n".join(" ".join(words[i] for i in torch.randint(0, len(words), (12,),
                                                                                           generator=g))
                                                 for _ in range(200)))
    (tmp_path / "ck").mkdir()
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "ck" / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(TINY, vocab_size=300))
    save_llama(model, str(tmp_path / "ck"))
    add_lora(model, rank=4, alpha=16)
    randomize_B(model, std=0.5)
    save_adapter(model, str(tmp_path / "adapter"))

    def run(*extra):
        out = tmp_path / f"out{len(extra)}.json"
        args = ["--checkpoint", str(tmp_path / "ck"), "--prompt", "the cat", "--max-new-tokens", "6",
                "--temperature", "0", "--template", "none", "--out", str(out), *extra]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), *args], capture_output=True,
                           text=True, cwd=root, timeout=120)
        return r, out

    r, out = run("--adapter", str(tmp_path / "adapter"))
    assert r.returncode == 0, r.stderr
    assert f"{count_parameters(model)[0]:,} LoRA parameters" in r.stdout
    r2, out2 = run("--adapter", str(tmp_path / "adapter"), "--merge")
    assert r2.returncode == 0 and "merged into W" in r2.stdout, r2.stderr
    text, text2 = json.loads(out.read_text())[0]["output"], json.loads(out2.read_text())[0]["output"]
    assert text and text == text2, (text, text2)
