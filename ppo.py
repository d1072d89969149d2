"""PPO for the third stage of RLHF (paper Sec. 3.1): rollout, Eq. 3 reward shaping, GAE, Eq. 2 losses.

One PPO step, in the paper's order:
  1. rollout      generate_responses: y ~ pi_theta(.|x); score_rollout: one forward each for log pi_old and
                  log pi_ref (policy_and_reference), V(x, y_<t) (state_values), the score (reward_score)
  2. Eq. 3        shape_rewards: r_t = -beta * D_t on every response token, + the score at the last one
  3. GAE          gae: advantages (whitened over valid tokens) and returns = advantages + values
  4. Eq. 2        policy_loss (clipped ratio pi_theta / pi_old) + vf_coef * value_loss (clipped)
  5. optimize     ppo_update: epochs x minibatches, gradient accumulation over distinct micro-batches
Tensor functions, and loops reading their knobs from `args` (train.py's Args); train.py owns models and devices.
Responses are right-padded: `mask` (B, N) is 1 on response tokens up to and including EOS, then 0.
Tests: python -m pytest tests/test_ppo.py
"""
import torch
import torch.nn.functional as F

import divergences
import llama
import lora
from divergences import masked_mean


# ----------------------------------------------------------------------------- tensor helpers

def logprobs_from_logits(logits, tokens):
    """log softmax(logits)[token] in fp32, without materializing the full log-softmax."""
    logits = logits.float()                                               # (B, N, V)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)          # (B, N)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits):
    logp = F.log_softmax(logits.float(), dim=-1)                          # (B, N, V)
    return -(logp.exp() * logp).sum(-1)                                   # (B, N)


# AlpacaFarm computes these statistics over padded positions too, so the many zeros after EOS pull
# the mean and variance; here every statistic is over valid tokens only (masked_mean from divergences.py).
def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)             # biased, like AlpacaFarm's


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over valid tokens; shift_mean=False adds the mean back (reward scaling)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask                                                     # padding stays 0


# ----------------------------------------------------------------------------- Eq. 3, GAE, Eq. 2

def shape_rewards(score, logprobs, ref_logprobs, mask, kl_coef, estimator):
    """Eq. 3: r = [0 ... 0 score] - beta * D per response token, 0 on padding, D = divergences.ESTIMATORS[estimator].
    score (B,), logprobs/ref_logprobs (B, N) of the sampled tokens, mask (B, N) -> rewards and penalty D (B, N)."""
    mask = mask.float()
    penalty = divergences.get_estimator(estimator)(logprobs.float(), ref_logprobs.float()) * mask   # (B, N)
    rewards = -kl_coef * penalty
    last = llama.last_index(mask)                                    # EOS, or the last token if cut off
    rewards = rewards.scatter_add(1, last[:, None], score.float()[:, None])
    return rewards, penalty


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over right-padded responses: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, with V and A zero past the last valid token (the episode ends there). Returns
    (advantages whitened over valid tokens, returns = advantages + values before whitening), (B, N), 0 on padding."""
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


def update_kl_coef(kl_coef, kl, args):
    """AlpacaFarm's adaptive controller, once per PPO step; kl = mean per-sequence divergence."""
    if not args.adaptive_kl:
        return kl_coef
    error = min(max(kl / args.kl_target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + args.k_beta * error)


# ----------------------------------------------------------------------------- 1. rollout

def device_of(model):
    return next(model.parameters()).device


def response_logits(model, tokens, mask, P, temperature):
    """Logits (fp32, / temperature) predicting each response token of tokens = prompt (P) + response (N)."""
    h = model.hidden(tokens, mask)[:, P - 1:-1].float()                   # (B, N, dim): state before y_t
    # the temperature divides h (dim wide), not the logits (V wide); contiguous, so that the head below is
    # one matrix product over B * N rows (a strided slice would make it a batched one)
    h = h / temperature if temperature not in (0, 1) else h.contiguous()
    # the head in fp32 even for bf16 weights: bf16 logits would round each log-prob by ~|logit| * 2^-9
    return F.linear(h, model.output.weight.float())                       # (B, N, V)


@torch.no_grad()
def generate_responses(policy, prompts, prompt_mask, args, eos_id, pad_id=0, generator=None):
    """1a. y ~ pi_theta(. | x) for left-padded prompts (B, P), in chunks of args.generate_batch_size.
    Returns responses (B, N) right-padded to the longest, and their mask (B, N)."""
    policy.eval()                                                         # no LoRA dropout while sampling
    chunks = [llama.generate(policy, prompts[i:i + args.generate_batch_size],
                             prompt_mask[i:i + args.generate_batch_size], args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, eos_id=eos_id, pad_id=pad_id,
                             generator=generator, cuda_graph=args.cuda_graph and prompts.device.type == "cuda")
              for i in range(0, prompts.shape[0], args.generate_batch_size)]
    N = max(out.shape[1] for out, _ in chunks)
    responses = torch.cat([F.pad(o, (0, N - o.shape[1]), value=pad_id) for o, _ in chunks])    # (B, N)
    mask = torch.cat([F.pad(m, (0, N - m.shape[1]), value=0) for _, m in chunks])              # (B, N)
    assert (mask.sum(1) > 0).all(), "rollout: llama.generate returned an empty response"
    return responses, mask


def policy_and_reference(policy, ref_model, tokens, full_mask, responses, mask, P, temperature):
    """1b. log pi_old(y_t | x, y_<t) and log pi_ref(y_t | x, y_<t) of the sampled tokens (b, N), fp32, plus the
    exact per-token KL(pi_old || pi_ref) and the policy's entropy (b, N) over the whole vocabulary. The reference
    is the policy with its adapters off unless a separate ref_model (maybe on another device) is given."""
    logits = response_logits(policy, tokens, full_mask, P, temperature)                        # (b, N, V)
    if ref_model is None:
        with lora.lora_disabled(policy):
            ref_logits = response_logits(policy, tokens, full_mask, P, temperature)
    else:
        rdev = device_of(ref_model)
        ref_logits = response_logits(ref_model, tokens.to(rdev), full_mask.to(rdev), P, temperature)
        ref_logits = ref_logits.to(logits.device)
    return (logprobs_from_logits(logits, responses), logprobs_from_logits(ref_logits, responses),
            divergences.kl_true(logits, ref_logits, mask), entropy_from_logits(logits))


def state_values(value_model, tokens, full_mask, P):
    """1c. V(x, y_<t) for each response token (b, N), fp32, read from the hidden state just before token t."""
    vdev = device_of(value_model)
    return value_model.values(tokens.to(vdev), full_mask.to(vdev))[:, P - 1:-1].float().to(tokens.device)


def reward_score(reward_model, tokens, full_mask, eos_id=None):
    """1d. the reward-model score r(x, y) (b,), fp32, at the last real token (positions from the mask). A reward
    model trained without EOS (reward_model.score_eos false: AlpacaFarm's, whose rollout re-tokenizes the response
    text without special tokens) reads the sequence without its final EOS, so at the token before. With one device
    the value model shares the reward model's backbone: lora_disabled turns its adapters off for the score."""
    if eos_id is not None and not reward_model.score_eos:
        last = llama.last_index(full_mask)                                                          # (b,)
        ends_in_eos = tokens.gather(1, last[:, None]).squeeze(1) == eos_id
        full_mask = full_mask.masked_fill(F.one_hot(last, tokens.shape[1]).bool() & ends_in_eos[:, None], 0)
    rdev = device_of(reward_model)
    with lora.lora_disabled(reward_model):
        return reward_model(tokens.to(rdev), full_mask.to(rdev)).float().to(tokens.device)


@torch.no_grad()
def score_rollout(policy, value_model, reward_model, prompts, prompt_mask, responses, mask, args, kl_coef,
                  eos_id, ref_model=None):
    """1b-d for sampled responses, then 2. Eq. 3 rewards and 3. GAE; returns (batch, stats).
    prompts, prompt_mask (B, P) left-padded; responses, mask (B, N) right-padded; kl_coef is the current
    beta; eos_id None = no EOS. batch holds those four and, per response token, logprobs, ref_logprobs,
    values, rewards, advantages, returns (B, N), 0 on padding; and score (B,). The models may sit on other
    devices than the prompts (tensors are moved explicitly). Every forward runs in eval mode (no dropout),
    in micro-batches so that the (b, N, V) logits of policy and reference live only for one chunk."""
    for m in (policy, value_model, reward_model, ref_model):
        if m is not None:
            m.eval()
    P = prompts.shape[1]
    tokens = torch.cat([prompts, responses], 1)                                                # (B, P+N)
    full_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)
    parts = []
    for i in range(0, prompts.shape[0], args.micro_batch_size):
        s = slice(i, i + args.micro_batch_size)
        parts.append((*policy_and_reference(policy, ref_model, tokens[s], full_mask[s], responses[s], mask[s], P,
                                            args.temperature),                                # 1b.
                      state_values(value_model, tokens[s], full_mask[s], P),                # 1c.
                      reward_score(reward_model, tokens[s], full_mask[s], eos_id)))         # 1d.
    logprobs, ref_logprobs, true_kl, entropy, values, score = (torch.cat(x) for x in zip(*parts))
    raw_score, fmask = score, mask.float()
    has_eos = ((responses == eos_id) & mask.bool()).any(1) if eos_id is not None else torch.zeros_like(score).bool()
    if args.no_eos_penalty is not None:       # responses that never stopped get a fixed, bad score
        score = torch.where(has_eos, score, torch.full_like(score, args.no_eos_penalty))

    # 2. Eq. 3 shaped rewards, optionally scaled by their std (mean kept), as AlpacaFarm
    shaped, penalty = shape_rewards(score, logprobs, ref_logprobs, fmask, kl_coef, args.estimator)
    rewards = whiten(shaped, fmask, shift_mean=False) if args.whiten_rewards else shaped
    # 3. GAE; returns before, advantages after whitening
    advantages, returns = gae(rewards, values * fmask, fmask, args.gamma, args.lam)

    batch = dict(prompts=prompts, prompt_mask=prompt_mask, responses=responses, mask=mask,
                 logprobs=logprobs * fmask, ref_logprobs=ref_logprobs * fmask, values=values * fmask,
                 rewards=rewards, advantages=advantages, returns=returns, score=score)
    stats = dict(score=raw_score.mean().item(),
                 shaped_reward=shaped.sum(1).mean().item(),         # per sequence, before scaling
                 penalty=masked_mean(penalty, fmask).item(),         # D_t per token
                 penalty_seq=penalty.sum(1).mean().item(),           # what the adaptive controller sees
                 true_kl=(true_kl * fmask).sum(1).mean().item(),     # exact KL(pi_theta || pi_ref) per sequence
                 entropy=masked_mean(entropy, fmask).item(), response_length=fmask.sum(1).mean().item(),
                 eos_fraction=has_eos.float().mean().item(), kl_coef=kl_coef)
    return batch, stats


# ----------------------------------------------------------------------------- 5. optimization phase

def explained_variance(returns, values, mask):
    """How much of the variance of the returns the values explain (1 = perfect, <= 0 = none), over valid tokens."""
    var_returns = masked_var(returns, mask)
    return (1.0 - masked_var(returns - values, mask) / var_returns).item() if var_returns > 0 else float("nan")


def ppo_update(policy, value_model, optimizer, scheduler, batch, args, sync_grads=None, generator=None):
    """args.ppo_epochs passes over the rollout in shuffled step batches of args.step_batch_size distinct samples,
    one optimizer step each, accumulated over micro-batches weighted by their share of the step batch's valid tokens:
    the gradient of the token mean over the step batch (AlpacaFarm back-propagates one 16-sample minibatch several
    times without dividing). sync_grads, if given, runs before clipping (e.g. an all-reduce: the mean of the ranks'
    token means, each rank whitened on its own). The scheduler steps once per call (per PPO step, as AlpacaFarm).
    Returns the stats averaged over the steps. One function, as CleanRL's update: the three loops read together."""
    policy.train()
    value_model.train()
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    dev, P = batch["prompts"].device, batch["prompts"].shape[1]
    tokens = torch.cat([batch["prompts"], batch["responses"]], 1)                          # (B, P+N)
    full_mask = torch.cat([batch["prompt_mask"], batch["mask"].to(batch["prompt_mask"].dtype)], 1)
    fmask = batch["mask"].float()
    sums, n_steps = {}, 0
    for epoch in range(args.ppo_epochs):
        perm = torch.randperm(tokens.shape[0], generator=generator).to(dev)
        for start in range(0, tokens.shape[0], args.step_batch_size):
            idx = perm[start:start + args.step_batch_size]
            optimizer.zero_grad(set_to_none=True)
            step_stats = {}
            for mstart in range(0, len(idx), args.micro_batch_size):
                mb = idx[mstart:mstart + args.micro_batch_size]
                mb_mask = fmask[mb]
                weight = mb_mask.sum() / fmask[idx].sum()               # share of the step batch's valid tokens
                # log pi_theta(y_t) and V(x, y_<t) under the current parameters (dropout on)
                logits = response_logits(policy, tokens[mb], full_mask[mb], P, args.temperature)  # (b, N, V)
                mb_logprobs = logprobs_from_logits(logits, batch["responses"][mb])
                vpred = state_values(value_model, tokens[mb], full_mask[mb], P)                  # (b, N)
                # 4. Eq. 2 and the clipped value loss
                pg_loss, pg_stats = policy_loss(mb_logprobs, batch["logprobs"][mb], batch["advantages"][mb],
                                                mb_mask, args.cliprange)
                vf_loss, vf_stats = value_loss(vpred, batch["values"][mb], batch["returns"][mb], mb_mask,
                                               args.cliprange_value)
                loss = pg_loss + args.vf_coef * vf_loss
                (loss * weight).backward()  # a non-finite loss makes the gradient norm below non-finite too
                with torch.no_grad():
                    ent = masked_mean(entropy_from_logits(logits), mb_mask).item()
                del logits
                for k, v in dict(loss=loss.item(), pg_loss=pg_loss.item(), vf_loss=vf_loss.item(),
                                 entropy=ent, **pg_stats, **vf_stats).items():
                    step_stats[k] = step_stats.get(k, 0.0) + weight.item() * v
            # 5. one optimizer step on the step batch: (all-reduce), joint clip, update. A NaN reaches every
            # rank through sync_grads, so all ranks stop at this one check instead of hanging in a collective
            if sync_grads is not None:
                sync_grads()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"ppo_update: gradient norm is {grad_norm.item()} (loss "
                                         f"{step_stats['loss']}) at epoch {epoch}, optimizer step {n_steps}")
            optimizer.step()
            n_steps += 1
            for k, v in dict(step_stats, grad_norm=grad_norm.item()).items():
                sums[k] = sums.get(k, 0.0) + v
    if not all(torch.isfinite(p).all() for p in params):  # e.g. an overflow in Adam's moments
        raise FloatingPointError("ppo_update: trainable weights are not finite after the update")
    stats = {k: v / n_steps for k, v in sums.items()} | dict(lr=optimizer.param_groups[0]["lr"])
    if scheduler is not None:
        scheduler.step()
    return stats | dict(explained_variance=explained_variance(batch["returns"], batch["values"], fmask))
