"""PPO for the third stage of RLHF (paper Sec. 3.1): rollout, Eq. 3 reward shaping, GAE, Eq. 2 losses.

One PPO step, in the paper's order:
  1. rollout      generate y ~ pi_theta(.|x); one forward each for log pi_old, log pi_ref, V(x, y_<t), score
  2. Eq. 3        shape_rewards: r_t = -beta * D_t on every response token, + the score at the last one
  3. GAE          gae: advantages (whitened over valid tokens) and returns = advantages + values
  4. Eq. 2        policy_loss (clipped ratio pi_theta / pi_old) + vf_coef * value_loss (clipped)
  5. optimize     ppo_update: epochs x minibatches, gradient accumulation over distinct micro-batches
Plain functions over tensors plus two loop functions; the train script owns models, devices and logging.
Responses are right-padded: `mask` (B, N) is 1 on response tokens up to and including EOS, then 0.
Tests: python -m pytest tests/test_ppo.py
"""
import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import divergences
import llama
import lora


@dataclass
class PPOConfig:
    # Eq. 3: per-token reward r_t = -kl_coef * D_t, plus the reward-model score at the last token
    kl_coef: float = 0.02           # beta
    estimator: str = "kl"           # D_t: a key of divergences.ESTIMATORS
    adaptive_kl: bool = False       # AlpacaFarm's controller (off in the paper)
    kl_target: float = 6.0          # target of the per-sequence divergence sum (adaptive only)
    k_beta: float = 0.1             # controller gain: beta *= 1 + k_beta * clip(KL / target - 1, -0.2, 0.2)
    no_eos_penalty: float | None = None  # e.g. -1.0: score given to responses that never emit EOS
    whiten_rewards: bool = True     # scale shaped rewards by their std, keeping the mean (as the reference)
    # GAE (Schulman et al. 2016)
    gamma: float = 1.0
    lam: float = 0.95               # upstream AlpacaFarm: 1.0
    # Eq. 2 and the value loss
    cliprange: float = 0.2          # epsilon
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    # optimization phase
    ppo_epochs: int = 2
    rollout_batch_size: int = 256
    step_batch_size: int = 128      # samples per optimizer step
    micro_batch_size: int = 16      # samples per forward/backward (also the rollout forward chunk)
    max_grad_norm: float = 1.0      # joint over policy + value trainable parameters
    # rollout generation
    max_new_tokens: int = 300
    temperature: float = 1.0
    top_p: float = 1.0
    generate_batch_size: int = 64   # prompts per llama.generate call (decoding is memory-light)


# ----------------------------------------------------------------------------- tensor helpers

def logprobs_from_logits(logits, tokens):
    """log softmax(logits)[token] in fp32, without materializing the full log-softmax."""
    logits = logits.float()                                               # (B, N, V)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)          # (B, N)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits):
    logp = F.log_softmax(logits.float(), dim=-1)                          # (B, N, V)
    return -(logp.exp() * logp).sum(-1)                                   # (B, N)


# The reference computes these statistics over padded positions too, so the many zeros after EOS pull
# the mean and variance; here every statistic is over valid tokens only.
def masked_mean(x, mask):
    n = mask.sum()
    assert n > 0, "masked_mean: the mask selects no element"
    return (x * mask).sum() / n


def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)             # biased, like the reference


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over valid tokens; shift_mean=False adds the mean back (reward scaling)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask                                                     # padding stays 0


def last_index(mask):
    """Index of the last 1 in each row of a (B, N) mask."""
    assert (mask.sum(-1) > 0).all(), "every sequence needs at least one valid token"
    N = mask.shape[-1]
    return (mask.long() * torch.arange(1, N + 1, device=mask.device)).argmax(-1)   # (B,)


# ----------------------------------------------------------------------------- Eq. 3, GAE, Eq. 2

def shape_rewards(score, logprobs, ref_logprobs, mask, kl_coef, estimator):
    """Eq. 3: r = [0 ... 0 score] - beta * D, per response token; padding gets 0.

    score (B,), logprobs/ref_logprobs (B, N) of the sampled tokens, mask (B, N). Returns rewards (B, N)
    and the penalty D (B, N). D_t comes from divergences.ESTIMATORS[estimator](logp, logq).
    """
    if estimator not in divergences.ESTIMATORS:
        raise ValueError(f"PPO estimator {estimator!r} unknown; choose one of {sorted(divergences.ESTIMATORS)}")
    mask = mask.float()
    penalty = divergences.ESTIMATORS[estimator](logprobs.float(), ref_logprobs.float()) * mask   # (B, N)
    rewards = -kl_coef * penalty
    last = last_index(mask)                                    # EOS, or the last token if cut off
    rewards = rewards.scatter_add(1, last[:, None], score.float()[:, None])
    return rewards, penalty


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over right-padded responses.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}, with V and A zero past the
    last valid token (the episode ends there). Returns (advantages whitened over valid tokens, returns =
    advantages + values taken before whitening), both (B, N) and 0 on padding.
    """
    mask = mask.to(rewards.dtype)
    B, N = rewards.shape
    adv = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(N)):
        next_mask = mask[:, t + 1] if t + 1 < N else torch.zeros_like(lastgaelam)
        next_value = values[:, t + 1] * next_mask if t + 1 < N else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = (delta + gamma * lam * next_mask * lastgaelam) * mask[:, t]
        adv[:, t] = lastgaelam
    returns = (adv + values) * mask
    return whiten(adv, mask, shift_mean=True), returns


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """Eq. 2, negated for gradient descent: max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi_theta / pi_old."""
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)                                   # (B, N)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(losses1, losses2), mask)
    with torch.no_grad():
        stats = dict(pg_clipfrac=masked_mean((losses2 > losses1).to(mask.dtype), mask).item(),
                     approx_kl=masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item())
    return loss, stats


def value_loss(vpred, old_values, returns, mask, cliprange_value):
    """Clipped value loss: 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2), mean over valid tokens."""
    mask = mask.to(vpred.dtype)
    vclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    losses1 = (vpred - returns) ** 2
    losses2 = (vclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses1, losses2), mask)
    with torch.no_grad():
        stats = dict(vf_clipfrac=masked_mean((losses2 > losses1).to(mask.dtype), mask).item(),
                     value_error=masked_mean(losses1, mask).item())
    return loss, stats


def update_kl_coef(kl_coef, kl, cfg):
    """AlpacaFarm's adaptive controller, once per PPO step; kl = mean per-sequence divergence."""
    if not cfg.adaptive_kl:
        return kl_coef
    error = min(max(kl / cfg.kl_target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + cfg.k_beta * error)


# ----------------------------------------------------------------------------- 1. rollout

def response_logits(model, tokens, mask, P, temperature):
    """Logits (fp32, / temperature) predicting each response token of tokens = prompt (P) + response (N)."""
    h = model.hidden(tokens, mask)[:, P - 1:-1]                           # (B, N, dim): state before y_t
    # the head in fp32 even for bf16 weights: bf16 logits would round each log-prob by ~|logit| * 2^-9
    logits = F.linear(h.float(), model.output.weight.float())             # (B, N, V)
    return logits / (temperature if temperature > 0 else 1.0)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def rollout(policy, value_model, reward_model, prompts, prompt_mask, cfg, kl_coef, eos_id, pad_id=0,
            ref_model=None, generator=None):
    """Sample responses to left-padded prompts (B, P) and score them; returns (batch, stats).

    kl_coef is the current beta (cfg.kl_coef, or the adaptive controller's value); eos_id None = no EOS.
    batch holds prompts, prompt_mask (B, P), responses, mask (B, N) and, per response token, logprobs,
    ref_logprobs, values, rewards, advantages, returns (B, N), 0 on padding; and score (B,).
    The reference policy is the policy with its adapters off (lora.lora_disabled) unless a separate
    ref_model is given; ref_model, value_model and reward_model may sit on other devices (tensors are
    moved explicitly). All models are put in eval mode: no LoRA dropout while sampling and scoring.
    """
    for m in (policy, value_model, reward_model, ref_model):
        if m is not None:
            m.eval()
    dev, B, P = prompts.device, prompts.shape[0], prompts.shape[1]
    shared = getattr(reward_model, "backbone", None) is getattr(value_model, "backbone", False)
    t0 = time.time()

    # 1a. generate y ~ pi_theta(. | x), in chunks; responses right-padded to a common length N
    chunks = []
    for i in range(0, B, cfg.generate_batch_size):
        out, out_mask, _ = llama.generate(policy, prompts[i:i + cfg.generate_batch_size],
                                          prompt_mask[i:i + cfg.generate_batch_size], cfg.max_new_tokens,
                                          temperature=cfg.temperature, top_p=cfg.top_p, eos_id=eos_id,
                                          pad_id=pad_id, generator=generator)
        chunks.append((out, out_mask))
    N = max(out.shape[1] for out, _ in chunks)
    responses = torch.cat([F.pad(o, (0, N - o.shape[1]), value=pad_id) for o, _ in chunks])    # (B, N)
    mask = torch.cat([F.pad(m, (0, N - m.shape[1]), value=0) for _, m in chunks])              # (B, N)
    assert (mask.sum(1) > 0).all(), "rollout: llama.generate returned an empty response"
    t1 = time.time()
    tokens = torch.cat([prompts, responses], 1)                                                # (B, P+N)
    full_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)

    # 1b-d. one forward per model over prompt + response, in micro-batches so that the (b, N, V) logits of
    # policy and reference live only for one chunk
    logprobs, ref_logprobs, true_kl, entropy, values, score = [], [], [], [], [], []
    for i in range(0, B, cfg.micro_batch_size):
        s = slice(i, i + cfg.micro_batch_size)
        # 1b. log pi_old(y_t | x, y_<t) and log pi_ref(y_t | x, y_<t), fp32
        logits = response_logits(policy, tokens[s], full_mask[s], P, cfg.temperature)        # (b, N, V)
        if ref_model is None:
            with lora.lora_disabled(policy):
                ref_logits = response_logits(policy, tokens[s], full_mask[s], P, cfg.temperature)
        else:
            rdev = _device(ref_model)
            ref_logits = response_logits(ref_model, tokens[s].to(rdev), full_mask[s].to(rdev), P,
                                         cfg.temperature).to(dev)
        logprobs.append(logprobs_from_logits(logits, responses[s]))
        ref_logprobs.append(logprobs_from_logits(ref_logits, responses[s]))
        true_kl.append(divergences.kl_true(logits, ref_logits, mask[s]))                     # (b, N)
        entropy.append(entropy_from_logits(logits))
        del logits, ref_logits
        # 1c. values V(x, y_<t), read from the hidden state just before token t
        vdev = _device(value_model)
        v = value_model.values(tokens[s].to(vdev), full_mask[s].to(vdev))                     # (b, P+N)
        values.append(v[:, P - 1:-1].float().to(dev))
        # 1d. reward-model score r(x, y) at the last real token (positions from the mask). On one device
        # the value model may be built on the reward model's own backbone; its adapters are then off here.
        rdev = _device(reward_model)
        with lora.lora_disabled(reward_model) if shared else contextlib.nullcontext():
            score.append(reward_model(tokens[s].to(rdev), full_mask[s].to(rdev)).float().to(dev))
    logprobs, ref_logprobs, true_kl, entropy, values, score = (
        torch.cat(x) for x in (logprobs, ref_logprobs, true_kl, entropy, values, score))
    raw_score = score
    has_eos = (((responses == eos_id) & mask.bool()).any(1) if eos_id is not None
               else torch.zeros(B, dtype=torch.bool, device=dev))                             # (B,)
    if cfg.no_eos_penalty is not None:       # responses that never stopped get a fixed, bad score
        score = torch.where(has_eos, score, torch.full_like(score, cfg.no_eos_penalty))

    # 2. Eq. 3 shaped rewards, optionally scaled by their std (mean kept), as the reference
    fmask = mask.float()
    rewards, penalty = shape_rewards(score, logprobs, ref_logprobs, fmask, kl_coef, cfg.estimator)
    shaped = rewards
    if cfg.whiten_rewards:
        rewards = whiten(rewards, fmask, shift_mean=False)
    # 3. GAE; returns before, advantages after whitening
    advantages, returns = gae(rewards, values * fmask, fmask, cfg.gamma, cfg.lam)

    batch = dict(prompts=prompts, prompt_mask=prompt_mask, responses=responses, mask=mask,
                 logprobs=logprobs * fmask, ref_logprobs=ref_logprobs * fmask, values=values * fmask,
                 rewards=rewards, advantages=advantages, returns=returns, score=score)
    stats = dict(score=raw_score.mean().item(),
                 shaped_reward=shaped.sum(1).mean().item(),         # per sequence, before scaling
                 penalty=masked_mean(penalty, fmask).item(),         # D_t per token
                 penalty_seq=penalty.sum(1).mean().item(),           # what the adaptive controller sees
                 true_kl=(true_kl * fmask).sum(1).mean().item(),     # exact KL(pi_theta || pi_ref) per sequence
                 entropy=masked_mean(entropy, fmask).item(),
                 response_length=fmask.sum(1).mean().item(),
                 eos_fraction=has_eos.float().mean().item(),
                 kl_coef=kl_coef)
    # seconds of 1a and of 1b-3 (log-probs, reference, values, score, GAE); the .item() calls above have waited
    # for the devices
    stats.update(time_generate=t1 - t0, time_score=time.time() - t1)
    return batch, stats


# ----------------------------------------------------------------------------- 5. optimization phase

def ppo_update(policy, value_model, optimizer, scheduler, batch, cfg, sync_grads=None, generator=None):
    """ppo_epochs passes over the rollout in shuffled step batches; returns one stats dict (means).

    Each optimizer step sees a step batch of cfg.step_batch_size distinct samples, accumulated over
    micro-batches whose loss is weighted by their share of the step batch's valid tokens, so the gradient
    equals that of the token mean over the whole step batch (with several ranks, sync_grads averages the
    ranks' token means, and whitening statistics are per rank). (The reference back-propagates one
    16-sample minibatch several times without dividing; we do not copy that.) sync_grads, if given, is
    called before clipping (e.g. an all-reduce across ranks). The scheduler steps once per call, i.e. once
    per PPO step, as in AlpacaFarm.
    """
    policy.train()
    value_model.train()
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    dev, P = batch["prompts"].device, batch["prompts"].shape[1]
    vdev = _device(value_model)
    tokens = torch.cat([batch["prompts"], batch["responses"]], 1)                          # (B, P+N)
    full_mask = torch.cat([batch["prompt_mask"], batch["mask"].to(batch["prompt_mask"].dtype)], 1)
    fmask = batch["mask"].float()
    B = tokens.shape[0]
    sums, n_steps = {}, 0
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator).to(dev)
        for start in range(0, B, cfg.step_batch_size):
            idx = perm[start:start + cfg.step_batch_size]
            n_tokens = fmask[idx].sum()
            optimizer.zero_grad(set_to_none=True)
            step_stats, bad_loss = {}, None
            for mstart in range(0, len(idx), cfg.micro_batch_size):
                mb = idx[mstart:mstart + cfg.micro_batch_size]
                mb_mask = fmask[mb]
                weight = mb_mask.sum() / n_tokens                 # share of the step batch's valid tokens
                # log pi_theta(y_t) and V(x, y_<t) under the current parameters (dropout on)
                logits = response_logits(policy, tokens[mb], full_mask[mb], P, cfg.temperature)  # (b, N, V)
                mb_logprobs = logprobs_from_logits(logits, batch["responses"][mb])
                vpred = value_model.values(tokens[mb].to(vdev), full_mask[mb].to(vdev))[:, P - 1:-1]
                vpred = vpred.float().to(dev)
                # 4. Eq. 2 and the clipped value loss
                pg_loss, pg_stats = policy_loss(mb_logprobs, batch["logprobs"][mb], batch["advantages"][mb],
                                                mb_mask, cfg.cliprange)
                vf_loss, vf_stats = value_loss(vpred, batch["values"][mb], batch["returns"][mb], mb_mask,
                                               cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if not torch.isfinite(loss) and bad_loss is None:
                    bad_loss = f"loss is {loss.item()} in the micro-batch starting at {mstart}"
                # a non-finite loss still back-propagates: its NaN gradients reach every rank through
                # sync_grads, so all ranks stop at the same check below instead of hanging in a collective
                (loss * weight).backward()
                with torch.no_grad():
                    ent = masked_mean(entropy_from_logits(logits), mb_mask).item()
                del logits
                w = weight.item()
                for k, v in dict(loss=loss.item(), pg_loss=pg_loss.item(), vf_loss=vf_loss.item(),
                                 entropy=ent, **pg_stats, **vf_stats).items():
                    step_stats[k] = step_stats.get(k, 0.0) + w * v
            # 5. one optimizer step on the step batch: (all-reduce), joint clip, update
            if sync_grads is not None:
                sync_grads()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            if not math.isfinite(grad_norm) or bad_loss is not None:
                raise FloatingPointError(f"ppo_update: {bad_loss or 'gradient norm is ' + str(grad_norm)} at "
                                         f"epoch {epoch}, optimizer step {n_steps}")
            step_stats["grad_norm"] = grad_norm
            optimizer.step()
            n_steps += 1
            for k, v in step_stats.items():
                sums[k] = sums.get(k, 0.0) + v
    stats = {k: v / n_steps for k, v in sums.items()}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    if scheduler is not None:
        scheduler.step()
    # how much of the variance of the returns the rollout's values explain (1 = perfect, <= 0 = none)
    var_returns = masked_var(batch["returns"], fmask)
    stats["explained_variance"] = (1.0 - masked_var(batch["returns"] - batch["values"], fmask)
                                   / var_returns).item() if var_returns > 0 else float("nan")
    return stats
