"""LoRA: low-rank adapters on a frozen LLaMA.

Paper Eq. 1 (Hu et al. 2021, as used by Sun, Gupta & Iyyer 2023):

    h_out = (W + (alpha / k) B A) h_in        W (d_out, d_in) frozen, A (k, d_in), B (d_out, k)

A starts Kaiming-uniform (a = sqrt(5)), B starts at zero, so a fresh adapter changes nothing. The paper
uses k = 8, alpha = 64 (scale 8), dropout p = 0.1 on the LoRA path, on wq, wk, wv, wo of every layer:
8,388,608 trainable parameters for LLaMA-7B.

    from lora import add_lora, lora_disabled
    params = add_lora(model, rank=8, alpha=64, dropout=0.1)    # freezes everything else
    logits = model(tokens)                 # policy  pi_theta
    with lora_disabled(model):
        ref_logits = model(tokens)         # reference pi_ref: same weights, adapters off, no second copy
    checkpoints.save_adapter(model, "out/adapter")   # PEFT's file layout (see checkpoints.py)

Test: python -m pytest tests/test_lora.py
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# the projections LoRA may wrap (Meta names) -> the submodule of a layer that holds them
TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w3": "feed_forward", "w2": "feed_forward"}


class LoRALinear(nn.Module):
    """y = W x + (alpha / rank) B A dropout(x). W is the base nn.Linear's own (frozen) Parameter.

    A and B live in `lora_dtype` (default: W's dtype). With bf16 weights pass torch.float32: an Adam step
    of lr 1e-5 on an A entry of ~1/sqrt(4096) = 0.016 is a relative change of ~6e-4, below bf16's
    resolution (2^-8 = 3.9e-3), so most entries of a bf16 A would round back to where they were.
    The LoRA path itself is computed in the input's dtype (A, B cast on the fly; the cast is
    differentiable, so the gradients land in fp32 A, B and the fp32 A, B are the optimizer's master copy).
    A merged layer is for inference: it skips the LoRA path, so A and B get no gradient.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, lora_dtype=None):
        super().__init__()
        assert isinstance(base, nn.Linear), f"LoRALinear wraps nn.Linear, got {type(base).__name__}"
        assert rank > 0, f"rank must be positive, got {rank}"
        assert 0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}"
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the same Parameter object: no copy
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=lora_dtype or base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (rank, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # (out, rank)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT: U(+-1/sqrt(in))
        self.dropout = nn.Dropout(dropout)  # acts only in train mode
        self.train(base.training)  # injected into an eval() model, stay in eval mode
        self.merged = False    # W currently holds W + scale B A (set only by merge()/unmerge())
        self.disabled = False  # W x alone (set only by lora_disabled())

    def forward(self, x):  # x (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged:  # W x alone, or W already holds W + scale B A
            assert not (self.disabled and self.merged), "adapters are merged into W; unmerge() before disabling"
            return y
        h = F.linear(self.dropout(x) if self.training else x, self.lora_A.to(x.dtype))  # (..., rank); eval: no call
        return y + self.scale * F.linear(h, self.lora_B.to(x.dtype))

    def delta_weight(self):  # (out, in) = (alpha / rank) B A, in the LoRA dtype
        return self.scale * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self):
        """W <- W + (alpha/rank) B A, for fast inference. In bf16 merging rounds W; see unmerge()."""
        assert not self.merged, "merge() called twice"
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - (alpha/rank) B A: W back up to rounding (within an ulp of |W| + |dW| in W's dtype)."""
        assert self.merged, "unmerge() without merge()"
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout.p}, merged={self.merged}")


def lora_layers(model):
    """[(layer index, Meta target name, LoRALinear)] over model.layers, in file order."""
    out = []
    for i, layer in enumerate(model.layers):
        for t, parent in TARGETS.items():
            m = getattr(getattr(layer, parent), t)
            if isinstance(m, LoRALinear):
                out.append((i, t, m))
    return out


def add_lora(model, rank=8, alpha=64, dropout=0.1, targets=("wq", "wk", "wv", "wo"), lora_dtype=None):
    """Replace `targets` in every layer by LoRALinear, freeze everything else; returns the trainable params.
    Works on a model built on the meta device (counting parameters without allocating them)."""
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets or len(set(targets)) < len(targets):
        raise ValueError(f"LoRA targets {list(targets)}: each one of {', '.join(TARGETS)} at most once (or all)")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; add_lora() once per model")
    model.requires_grad_(False)
    for layer in model.layers:
        for t in targets:
            parent = getattr(layer, TARGETS[t])
            setattr(parent, t, LoRALinear(getattr(parent, t), rank, alpha, dropout, lora_dtype))
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def lora_disabled(model):
    """Within the block every LoRALinear in `model` computes W x alone (the reference policy pi_ref)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if any(m.merged for m in layers):
        raise RuntimeError("lora_disabled: adapters are merged into W; call unmerge_lora(model) first")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def merge_lora(model):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def count_parameters(model):
    """(trainable, total) number of parameter elements; shared parameters are counted once."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)
