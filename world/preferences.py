"""
Stage 2 of RLHF for the small world: fit its reward model on preference pairs with reward.py's Bradley-Terry loss,
and measure how often a reward model prefers the chosen response. world/build.py calls both for its reward stage.
"""
import torch

import llama
from reward import bradley_terry_loss


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
