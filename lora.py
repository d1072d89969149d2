"""LoRA: low-rank adapters on a frozen LLaMA, and adapter files in PEFT's layout.

Paper Eq. 1 (Hu et al. 2021, as used by Sun, Gupta & Iyyer 2023):

    h_out = (W + (alpha / k) B A) h_in        W (d_out, d_in) frozen, A (k, d_in), B (d_out, k)

A starts Kaiming-uniform (a = sqrt(5)), B starts at zero, so a fresh adapter changes nothing. The paper
uses k = 8, alpha = 64 (scale 8), dropout p = 0.1 on the LoRA path, on wq, wk, wv, wo of every layer:
8,388,608 trainable parameters for LLaMA-7B.

    from lora import add_lora, lora_disabled, save_adapter, load_adapter
    params = add_lora(model, rank=8, alpha=64, dropout=0.1)    # freezes everything else
    logits = model(tokens)                 # policy  pi_theta
    with lora_disabled(model):
        ref_logits = model(tokens)         # reference pi_ref: same weights, adapters off, no second copy
    save_adapter(model, "out/adapter")     # adapter_config.json + adapter_model.safetensors (PEFT names)

Test: python -m pytest tests/test_lora.py
"""
import contextlib
import json
import math
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

# Meta names inside the model -> (submodule of a layer, name in HF/PEFT files). Translated only here.
TARGETS = {
    "wq": ("attention", "self_attn.q_proj"),
    "wk": ("attention", "self_attn.k_proj"),
    "wv": ("attention", "self_attn.v_proj"),
    "wo": ("attention", "self_attn.o_proj"),
    "w1": ("feed_forward", "mlp.gate_proj"),
    "w3": ("feed_forward", "mlp.up_proj"),
    "w2": ("feed_forward", "mlp.down_proj"),
}
HF_TO_META = {hf.split(".")[1]: meta for meta, (_, hf) in TARGETS.items()}  # "q_proj" -> "wq"
PEFT_PREFIX = "base_model.model.model.layers"


class LoRALinear(nn.Module):
    """y = W x + (alpha / rank) B A dropout(x). W is the base nn.Linear's own (frozen) Parameter.

    A and B live in `lora_dtype` (default: W's dtype). With bf16 weights pass torch.float32: an Adam step
    of lr 1e-5 on an A entry of ~1/sqrt(4096) = 0.016 is a relative change of ~6e-4, below bf16's
    resolution (2^-8 = 3.9e-3); measured, 75% of a 4096-wide bf16 A stays unchanged after such a step.
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
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., rank)
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
        for t, (parent, _) in TARGETS.items():
            m = getattr(getattr(layer, parent), t)
            if isinstance(m, LoRALinear):
                out.append((i, t, m))
    return out


def add_lora(model, rank=8, alpha=64, dropout=0.1, targets=("wq", "wk", "wv", "wo"), lora_dtype=None):
    """Replace `targets` in every layer by LoRALinear, freeze everything else; returns the trainable params.
    Works on a model built on the meta device (counting parameters without allocating them)."""
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA targets {bad or list(targets)}; choose from {list(TARGETS)}")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; add_lora() once per model")
    model.requires_grad_(False)
    for layer in model.layers:
        for t in targets:
            parent = getattr(layer, TARGETS[t][0])
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


# ----------------------------------------------------------------------------- PEFT adapter files

def _peft_key(i, t, ab):  # e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    return f"{PEFT_PREFIX}.{i}.{TARGETS[t][1]}.lora_{ab}.weight"


def lora_state_dict(model):
    """{PEFT key: tensor} of every adapter (saved PEFT files carry no adapter name such as "default")."""
    sd = {}
    for i, t, m in lora_layers(model):
        sd[_peft_key(i, t, "A")] = m.lora_A.detach()  # (rank, in)
        sd[_peft_key(i, t, "B")] = m.lora_B.detach()  # (out, rank)
    return sd


def _atomic_write(path, write):  # write(tmp_path) then rename: a crash never leaves a half-written file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_adapter(model, dir, base_model_name_or_path=None):
    """Write dir/adapter_config.json and dir/adapter_model.safetensors, loadable by PEFT and vLLM."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: model has no LoRA layers")
    hyper = {(m.rank, m.alpha, m.dropout.p) for _, _, m in layers}
    assert len(hyper) == 1, f"one adapter file holds one (rank, alpha, dropout), model has {hyper}"
    rank, alpha, p = hyper.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": p,
        "target_modules": sorted({TARGETS[t][1].split(".")[1] for _, t, _ in layers}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None,
    }
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    os.makedirs(dir, exist_ok=True)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
    _atomic_write(os.path.join(dir, "adapter_model.safetensors"),
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(os.path.join(dir, "adapter_config.json"), write_json)


def _read_config(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter config not found")
    try:
        with open(path) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    def need(ok, field, why):
        if not ok:
            raise ValueError(f"{path}: field {field!r} = {c.get(field)!r} {why}")
    need(c.get("peft_type") == "LORA", "peft_type", "is not 'LORA'")
    need(isinstance(c.get("r"), int) and c["r"] > 0, "r", "must be a positive integer")
    need(isinstance(c.get("lora_alpha"), (int, float)), "lora_alpha", "must be a number")
    need(isinstance(c.get("target_modules"), list), "target_modules", "must be a list of module names")
    unknown = [n for n in c["target_modules"] if n not in HF_TO_META]
    need(not unknown, "target_modules", f"has unknown names {unknown}; known: {list(HF_TO_META)}")
    need(c.get("bias", "none") == "none", "bias", "is not supported (only 'none')")
    # PEFT features that would change the math below: refuse rather than silently compute something else
    for field in ("use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                  "rank_pattern", "alpha_pattern"):
        need(not c.get(field), field, "is not supported here")
    return c


def _read_weights(dir):
    st, bin_ = os.path.join(dir, "adapter_model.safetensors"), os.path.join(dir, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        path, sd = st, load_file(st)
    elif os.path.isfile(bin_):
        path, sd = bin_, torch.load(bin_, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{dir}: neither adapter_model.safetensors nor adapter_model.bin found")
    # some writers keep PEFT's adapter name in the key (lora_A.default.weight); saved files usually don't
    return path, {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
                  for k, v in sd.items()}


def load_adapter(model, dir, lora_dtype=None):
    """Load a PEFT LoRA adapter into `model` (a Llama), injecting LoRA layers first if it has none.
    Every key, shape and name is checked before the model is touched."""
    cfg_path = os.path.join(dir, "adapter_config.json")
    c = _read_config(cfg_path)
    path, sd = _read_weights(dir)
    rank, alpha, targets = c["r"], c["lora_alpha"], sorted(HF_TO_META[n] for n in c["target_modules"])
    existing = lora_layers(model)
    if existing:
        have = ({m.rank for _, _, m in existing}, {m.alpha for _, _, m in existing},
                sorted({t for _, t, _ in existing}))
        if have != ({rank}, {alpha}, targets):
            raise ValueError(f"{cfg_path}: adapter has r={rank}, lora_alpha={alpha}, targets {targets}; "
                             f"model's LoRA layers have r={have[0]}, alpha={have[1]}, targets {have[2]}")
    expected = {}  # PEFT key -> expected shape
    for i, layer in enumerate(model.layers):
        for t in targets:
            m = getattr(getattr(layer, TARGETS[t][0]), t)
            expected[_peft_key(i, t, "A")] = (rank, m.in_features)
            expected[_peft_key(i, t, "B")] = (m.out_features, rank)
    for k, v in sd.items():
        if k not in expected:
            raise ValueError(f"{path}: unexpected key {k!r} (model has {len(model.layers)} layers, "
                             f"targets {c['target_modules']} from {cfg_path})")
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"{path}: key {k!r} has shape {tuple(v.shape)}, expected {expected[k]} "
                             f"(r={rank} from {cfg_path})")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} keys, first {missing[0]!r}")
    if any(m.merged for _, _, m in existing):
        raise ValueError("load_adapter: model's LoRA layers are merged; unmerge_lora(model) first")
    if not existing:
        add_lora(model, rank, alpha, float(c.get("lora_dropout", 0.0)), targets, lora_dtype)
    with torch.no_grad():
        for i, t, m in lora_layers(model):
            m.lora_A.copy_(sd[_peft_key(i, t, "A")])
            m.lora_B.copy_(sd[_peft_key(i, t, "B")])
    return model
