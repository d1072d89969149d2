"""Reward model, value model, and stage 2 of RLHF (Bradley-Terry preference training).

RewardModel: a LLaMA backbone + nn.Linear(dim, 1); the score r(x, y) is read from the final hidden state
of the last real token (left or right padding, positions from the mask), in fp32. Its parameter names
follow AlpacaFarm's (backbone, reward_head), so checkpoints.py reads the released AlpacaFarm reward models
and writes our own in the same layout.

ValueModel: V(x, y_<t) at every position; backbone initialized from the reward model (as AlpacaFarm), its
own LoRA on wq, wk, wv, wo, and a fully trained fp32 scalar head starting at zero.

Stage 2: P(chosen > rejected) = sigmoid(r_chosen - r_rejected) (Bradley-Terry); the loss is
-log sigmoid(r_chosen - r_rejected), averaged over pairs. train_reward_model() fits it and returns the
held-out preference accuracy.

    rm = checkpoints.load_reward_model("alpaca-farm-reward-model-human", device="cuda", dtype=torch.bfloat16)
    score = rm(tokens, mask)                                   # (B,) fp32
    value = ValueModel(rm.backbone)                            # one-device placement: shares the backbone
Tests: python -m pytest tests/test_reward.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
import lora


class RewardModel(nn.Module):
    def __init__(self, cfg, score_eos=True):
        super().__init__()
        self.backbone = llama.Llama(cfg)     # keeps its LM head (unused) so AlpacaFarm files round-trip
        self.reward_head = nn.Linear(cfg.dim, 1)
        nn.init.zeros_(self.reward_head.bias)
        self.score_eos = score_eos  # trained with a final EOS (ours) or without (AlpacaFarm's): ppo.reward_score

    def forward(self, tokens, mask=None):
        """tokens, mask (B, T) -> score (B,) in fp32."""
        if mask is None:
            mask = torch.ones_like(tokens)
        h = self.backbone.hidden(tokens, mask)                                     # (B, T, dim)
        h = h[torch.arange(h.shape[0], device=h.device), llama.last_index(mask)].float()  # (B, dim)
        return F.linear(h, self.reward_head.weight.float(), self.reward_head.bias.float()).squeeze(-1)


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
    train_pairs / eval_pairs: lists of (chosen, rejected), each a list of token ids of prompt + response (tokenized
    by the caller, e.g. world/build.py). The model stays on its device. Every parameter with requires_grad is
    trained: the model as is for a full fine-tune, or after lora.add_lora(model.backbone, ...) for LoRA (the reward
    head stays trainable). AdamW, no weight decay, constant lr. log: optional callable getting a line per epoch."""
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
