"""Numerical oracles for lora.py: Eq. 1 against float64, exact invariants, PEFT files, 7B parameter counts."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear

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
