"""Reward model, value model, and stage 2 of RLHF (Bradley-Terry preference training).

RewardModel: a LLaMA backbone + nn.Linear(dim, 1); the score r(x, y) is read from the final hidden state
of the last real token (left or right padding, positions from the mask), in fp32. Its checkpoint layout is
AlpacaFarm's (config.json with model_type "reward_model"; keys backbone_model.model.* in Hugging Face names,
backbone_model.lm_head.weight (unused), reward_head.weight, reward_head.bias), so one loader reads both the
released AlpacaFarm reward models and our own saves.

ValueModel: V(x, y_<t) at every position; backbone initialized from the reward model (as AlpacaFarm), its
own LoRA on wq, wk, wv, wo, and a fully trained fp32 scalar head starting at zero.

Stage 2: P(chosen > rejected) = sigmoid(r_chosen - r_rejected) (Bradley-Terry); the loss is
-log sigmoid(r_chosen - r_rejected), averaged over pairs. train_reward_model() fits it and returns the
held-out preference accuracy.

    rm = RewardModel.from_pretrained("alpaca-farm-reward-model-human", device="cuda", dtype=torch.bfloat16)
    score = rm(tokens, mask)                                   # (B,) fp32
Tests: python -m pytest tests/test_reward.py
"""
import glob
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
import lora

PREFIX = "backbone_model."     # AlpacaFarm: RewardModel.backbone_model is a LlamaForCausalLM


def last_token_hidden(h, mask):
    """h (B, T, dim), mask (B, T) -> the hidden state of each row's last real token (B, dim)."""
    assert (mask.sum(-1) > 0).all(), "every sequence needs at least one real token"
    T = mask.shape[1]
    last = (mask.long() * torch.arange(1, T + 1, device=mask.device)).argmax(-1)   # (B,) index of the last 1
    return h[torch.arange(h.shape[0], device=h.device), last]


class RewardModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone = llama.Llama(cfg)     # keeps its LM head (unused) so AlpacaFarm files round-trip
        self.reward_head = nn.Linear(cfg.dim, 1)
        nn.init.zeros_(self.reward_head.bias)

    def forward(self, tokens, mask=None):
        """tokens, mask (B, T) -> score (B,) in fp32."""
        if mask is None:
            mask = torch.ones_like(tokens)
        h = last_token_hidden(self.backbone.hidden(tokens, mask), mask).float()         # (B, dim)
        return F.linear(h, self.reward_head.weight.float(), self.reward_head.bias.float()).squeeze(-1)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, backbone_path=None):
        """Load an AlpacaFarm reward checkpoint or one written by save().

        The LLaMA shape comes from config.json itself (our files carry the LLaMA fields alongside), else from
        the backbone's config.json: backbone_path, or AlpacaFarm's backbone_model_name_or_path field.
        """
        c = _read_json(os.path.join(path, "config.json"))
        if c.get("model_type") != "reward_model":
            raise ValueError(f"{path}/config.json: model_type is {c.get('model_type')!r}, expected 'reward_model'")
        if "hidden_size" in c and backbone_path is None:
            cfg = llama.read_config(path)
        else:
            backbone_path = backbone_path or c.get("backbone_model_name_or_path")
            if not backbone_path or not os.path.isfile(os.path.join(backbone_path, "config.json")):
                raise FileNotFoundError(
                    f"{path}/config.json has no LLaMA fields and its backbone_model_name_or_path "
                    f"({backbone_path!r}) is not a local directory with a config.json; pass backbone_path= "
                    f"(the SFT model the reward model was trained from)")
            cfg = llama.read_config(backbone_path)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)
        unused = llama.load_weights(model.backbone, path, prefix=PREFIX)
        head = _head_tensors(path) if unused else {}
        for name in ("weight", "bias"):
            key = f"reward_head.{name}"
            if key not in head:
                raise ValueError(f"{path}: checkpoint lacks {key}")
            param = getattr(model.reward_head, name)
            if tuple(head[key].shape) != tuple(param.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(head[key].shape)}, expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(head[key])
        other = [k for k in unused if not k.startswith("reward_head.")]
        if other:
            raise ValueError(f"{path}: checkpoint has tensors a reward model does not use: {', '.join(other[:5])}")
        return model

    def save(self, path, backbone_model_name_or_path=None):
        """Write config.json + model.safetensors in AlpacaFarm's layout, atomically. LoRA adapters (if the
        backbone has them) are folded into the saved weights, W + (alpha/rank) B A; the model is not changed."""
        from safetensors.torch import save_file
        cfg = self.backbone.cfg
        tensors = {n: p for n, p in self.backbone.state_dict().items() if ".lora_" not in n}
        for i, t, m in lora.lora_layers(self.backbone):
            if not m.merged:
                w = m.weight.float() + m.delta_weight().float()
                tensors[f"layers.{i}.{lora.TARGETS[t][0]}.{t}.weight"] = w.to(m.weight.dtype)
        tensors = {PREFIX + llama.meta_to_hf_name(n): t.detach().cpu().contiguous() for n, t in tensors.items()}
        tensors.update({f"reward_head.{n}": p.detach().cpu().contiguous()
                        for n, p in self.reward_head.named_parameters()})
        config = {"architectures": ["RewardModel"], "model_type": "reward_model",
                  "backbone_model_name_or_path": backbone_model_name_or_path,
                  # the LLaMA fields alongside, in Hugging Face names, so the file is self-contained
                  "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
                  "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
                  "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
                  "max_position_embeddings": cfg.max_seq_len}
        os.makedirs(path, exist_ok=True)
        for file, write in (("model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"})),
                            ("config.json", lambda f: _write_json(f, config))):
            tmp = os.path.join(path, f".tmp-{file}")
            write(tmp)
            os.replace(tmp, os.path.join(path, file))


class ValueModel(nn.Module):
    """V(x, y_<t): backbone (from the reward model) + its own LoRA + a new fp32 scalar head."""

    def __init__(self, backbone, rank=8, alpha=64, dropout=0.1, lora_dtype=None):
        super().__init__()
        self.backbone = backbone
        lora.add_lora(self.backbone, rank=rank, alpha=alpha, dropout=dropout, lora_dtype=lora_dtype)  # freezes it
        # Zero weight and bias, as AlpacaFarm: V starts at 0 everywhere (no prior on the return), and the
        # first value gradients are hidden * (V - R), so the head learns from step one. The head is fp32 and
        # fully trained (dim + 1 parameters).
        self.value_head = nn.Linear(backbone.cfg.dim, 1, device=backbone.tok_embeddings.weight.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_reward_model(cls, path, device="cpu", dtype=torch.float32, backbone_path=None, **lora_kw):
        """Load the reward checkpoint once more (the value model trains on the policy's device, the frozen
        reward model may sit elsewhere) and keep its backbone; the reward head is dropped."""
        return cls(RewardModel.from_pretrained(path, device, dtype, backbone_path).backbone, **lora_kw)

    def values(self, tokens, mask=None):
        """tokens, mask (B, T) -> values (B, T) fp32; values[:, i] is read from the hidden state at i, i.e.
        it is V of the prefix tokens[:, :i+1] and so V(x, y_<t) for the token at i + 1."""
        h = self.backbone.hidden(tokens, mask).float()                             # (B, T, dim)
        return F.linear(h, self.value_head.weight.float(), self.value_head.bias.float()).squeeze(-1)


# ----------------------------------------------------------------------------- stage 2

def bradley_terry_loss(score_chosen, score_rejected):
    """-log sigmoid(r_chosen - r_rejected), mean over pairs (= log 2 when the scores are equal)."""
    return -F.logsigmoid(score_chosen.float() - score_rejected.float()).mean()


def _pair_scores(model, pairs, pad_id, device):
    chosen, rejected = zip(*pairs)
    tokens, mask = llama.left_pad(list(chosen) + list(rejected), pad_id)        # (2b, T)
    scores = model(tokens.to(device), mask.to(device))                          # (2b,)
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def preference_accuracy(model, pairs, batch_size=8, pad_id=0):
    """Fraction of pairs with r_chosen > r_rejected (ties count one half)."""
    model.eval()
    device, hits = next(model.parameters()).device, 0.0
    for i in range(0, len(pairs), batch_size):
        sc, sr = _pair_scores(model, pairs[i:i + batch_size], pad_id, device)
        hits += (sc > sr).sum().item() + 0.5 * (sc == sr).sum().item()
    return hits / len(pairs)


def train_reward_model(model, train_pairs, eval_pairs, epochs=1, lr=1e-5, batch_size=8, pad_id=0, seed=0,
                       log=None):
    """Fit a RewardModel on preference pairs with the Bradley-Terry loss; returns held-out accuracy.

    train_pairs / eval_pairs: lists of (chosen, rejected), each a list of token ids of prompt + response
    (tokenized by the caller, e.g. world.py). The model stays on its device. Every parameter with
    requires_grad is trained: pass the model as is for a full fine-tune, or call
    lora.add_lora(model.backbone, ...) first for LoRA (the reward head stays trainable). AdamW, no weight
    decay, constant lr. log: optional callable receiving one line per epoch.
    """
    if not train_pairs or not eval_pairs:
        raise ValueError(f"train_reward_model: need training and held-out pairs, got {len(train_pairs)} "
                         f"and {len(eval_pairs)}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order, total = torch.randperm(len(train_pairs), generator=g).tolist(), 0.0
        for i in range(0, len(order), batch_size):
            batch = [train_pairs[j] for j in order[i:i + batch_size]]
            loss = bradley_terry_loss(*_pair_scores(model, batch, pad_id, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train_reward_model: loss is {loss.item()} at epoch {epoch}, batch {i}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if log is not None:
            log(f"reward model epoch {epoch + 1}/{epochs}: train loss {total / len(order):.4f}, "
                f"held-out accuracy {preference_accuracy(model, eval_pairs, batch_size, pad_id):.3f}")
    return preference_accuracy(model, eval_pairs, batch_size, pad_id)


def _head_tensors(path):
    """The reward_head.* tensors only (safetensors: without reading the backbone a second time)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        return {k: t for k, t in llama.iter_tensors(path) if k.startswith("reward_head.")}
    from safetensors import safe_open
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("reward_head.")})
    return out


def _read_json(file):
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: malformed JSON ({e})") from None


def _write_json(file, obj):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
