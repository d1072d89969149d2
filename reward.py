"""Reward model, value model, and stage 2's Bradley-Terry loss (world/preferences.py fits the small world's).

RewardModel: a LLaMA backbone + nn.Linear(dim, 1); the score r(x, y) is read from the final hidden state
of the last real token (left or right padding, positions from the mask), in fp32. Its parameter names
follow AlpacaFarm's (backbone, reward_head), so checkpoints.py reads the released AlpacaFarm reward models
and writes our own in the same layout.

ValueModel: V(x, y_<t) at every position; backbone initialized from the reward model (as AlpacaFarm), its
own LoRA on wq, wk, wv, wo, and a fully trained fp32 scalar head starting at zero.

Stage 2: P(chosen > rejected) = sigmoid(r_chosen - r_rejected) (Bradley-Terry); the loss is
-log sigmoid(r_chosen - r_rejected), averaged over pairs. The paper starts from AlpacaFarm's trained reward
models; world/preferences.py fits the small world's with this loss and measures its preference accuracy.

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
    """V(x, y_<t): backbone (from the reward model) + its own LoRA (full=True: all of it trains) + a new fp32 head."""

    def __init__(self, backbone, rank=8, alpha=64, dropout=0.1, lora_dtype=None, targets=("wq", "wk", "wv", "wo"),
                 full=False):
        super().__init__()
        self.backbone = backbone
        if not full:
            lora.add_lora(self.backbone, rank, alpha, dropout, targets, lora_dtype)  # freezes it
        self.backbone.output.requires_grad_(False)  # values are read from hidden states: the LM head is unused
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

