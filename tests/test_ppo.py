"""ppo.py: GAE, whitening, Eq. 3 shaping and Eq. 2 losses against independent float64 computations;
ppo_update invariants; a tiny end-to-end learning run per divergence estimator."""
import copy
import math

import numpy as np
import pytest
import torch

import divergences
import llama
import lora
import ppo
import reward
import train


def padded_batch(B=6, N=9, seed=0):
    """Random float64 rewards/values with right padding; padding holds garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([N, 1, 4, 7, 2, N - 1][:B])
    mask = (torch.arange(N)[None, :] < lengths[:, None]).double()
    rewards = torch.randn(B, N, generator=g, dtype=torch.float64)
    values = torch.randn(B, N, generator=g, dtype=torch.float64)
    garbage = 1e3 * torch.randn(B, N, generator=g, dtype=torch.float64)
    rewards = torch.where(mask.bool(), rewards, garbage)
    values = torch.where(mask.bool(), values, -garbage)
    return rewards, values, mask, lengths.tolist()


def brute_force_advantages(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_k = r_k + gamma V_{k+1} - V_k, V_L = 0 (episode end)."""
    r, v = rewards.numpy(), values.numpy()
    A = np.zeros_like(r)
    for b, L in enumerate(lengths):
        delta = [r[b, k] + gamma * (v[b, k + 1] if k + 1 < L else 0.0) - v[b, k] for k in range(L)]
        for t in range(L):
            A[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
    return A


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_brute_force(gamma, lam):
    rewards, values, mask, lengths = padded_batch()
    adv, returns = ppo.gae(rewards, values, mask, gamma, lam)
    A = brute_force_advantages(rewards, values, lengths, gamma, lam)
    valid = mask.numpy().astype(bool)
    # returns = raw advantages + values, before whitening
    np.testing.assert_allclose(returns.numpy()[valid], (A + values.numpy())[valid], rtol=0, atol=1e-12)
    # advantages whitened over valid tokens only (biased variance, eps 1e-8 as in ppo.whiten)
    a = A[valid]
    np.testing.assert_allclose(adv.numpy()[valid], (a - a.mean()) / np.sqrt(a.var() + 1e-8), rtol=0, atol=1e-10)
    assert (adv.numpy()[~valid] == 0).all() and (returns.numpy()[~valid] == 0).all()


def test_gae_gamma_lambda_one_returns_are_future_reward_sums():
    rewards, values, mask, lengths = padded_batch(seed=1)
    _, returns = ppo.gae(rewards, values, mask, 1.0, 1.0)
    for b, L in enumerate(lengths):
        future = torch.flip(torch.cumsum(torch.flip(rewards[b, :L], [0]), 0), [0])
        torch.testing.assert_close(returns[b, :L], future, rtol=0, atol=1e-12)


def test_whiten_ignores_padding():
    rewards, _, mask, _ = padded_batch(seed=2)
    valid = mask.bool()
    x = rewards[valid].numpy()
    out = ppo.whiten(rewards, mask)
    np.testing.assert_allclose(out[valid].numpy(), (x - x.mean()) / np.sqrt(x.var() + 1e-8), atol=1e-12)
    assert (out[~valid] == 0).all()
    # reward scaling: divide deviations by the std, keep the mean
    scaled = ppo.whiten(rewards, mask, shift_mean=False)
    np.testing.assert_allclose(scaled[valid].numpy(), (x - x.mean()) / np.sqrt(x.var() + 1e-8) + x.mean(),
                               atol=1e-12)
    # changing what sits in the padding changes nothing
    other = torch.where(valid, rewards, torch.full_like(rewards, -7.0))
    assert torch.equal(ppo.whiten(other, mask), out)
    assert math.isclose(ppo.masked_mean(rewards, mask).item(), x.mean(), abs_tol=1e-12)
    assert math.isclose(ppo.masked_var(rewards, mask).item(), x.var(), abs_tol=1e-12)


@pytest.mark.parametrize("estimator", sorted(divergences.ESTIMATORS))
def test_shaped_reward_score_on_last_valid_token(estimator):
    g = torch.Generator().manual_seed(3)
    B, N, beta = 4, 6, 0.02
    lengths = torch.tensor([6, 1, 3, 5])
    mask = (torch.arange(N)[None, :] < lengths[:, None]).float()
    logprobs = -torch.rand(B, N, generator=g) * 3
    ref_logprobs = -torch.rand(B, N, generator=g) * 3
    score = torch.tensor([1.5, -2.0, 0.25, 3.0])
    rewards, penalty = ppo.shape_rewards(score, logprobs, ref_logprobs, mask, beta, estimator)
    D = divergences.ESTIMATORS[estimator](logprobs, ref_logprobs)
    expected = -beta * D * mask
    expected[torch.arange(B), lengths - 1] += score           # the score lands on the last valid token
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    assert (rewards[mask == 0] == 0).all() and (penalty[mask == 0] == 0).all()


def test_shaped_reward_kl_by_hand():
    # kl: D = logp - logq; one sequence of 2 valid tokens + 1 padding
    logprobs = torch.tensor([[-1.0, -2.0, -5.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, _ = ppo.shape_rewards(torch.tensor([2.0]), logprobs, ref_logprobs, mask, 0.1, "kl")
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * 0.5, 2.0 - 0.1 * -1.0, 0.0]]))
    with pytest.raises(ValueError, match="estimator"):
        ppo.shape_rewards(torch.tensor([2.0]), logprobs, ref_logprobs, mask, 0.1, "no-such-divergence")


# (advantage, ratio, loss term, d loss / d logprob) by hand for cliprange 0.2: loss = max(-A r, -A clip(r))
POLICY_CASES = [
    (+1.0, 1.5, -1.2, 0.0),    # A > 0, ratio above 1 + eps: clipped, no gradient
    (+1.0, 1.1, -1.1, -1.1),   # A > 0, inside: -A r, d/dlogp = -A r
    (+1.0, 0.5, -0.5, -0.5),   # A > 0, below 1 - eps: the unclipped term is the max
    (-1.0, 1.5, 1.5, 1.5),     # A < 0, above: unclipped
    (-1.0, 0.5, 0.8, 0.0),     # A < 0, below 1 - eps: clipped, no gradient
    (-2.0, 0.9, 1.8, 1.8),     # A < 0, inside
]


def test_policy_loss_and_gradient_by_hand():
    A = torch.tensor([[c[0] for c in POLICY_CASES] + [5.0]], dtype=torch.float64)   # + one padding slot
    ratio = torch.tensor([[c[1] for c in POLICY_CASES] + [3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0] * len(POLICY_CASES) + [0.0]], dtype=torch.float64)
    old = torch.full_like(A, -2.0)
    logprobs = (old + ratio.log()).requires_grad_()
    loss, stats = ppo.policy_loss(logprobs, old, A, mask, cliprange=0.2)
    n = len(POLICY_CASES)
    assert math.isclose(loss.item(), sum(c[2] for c in POLICY_CASES) / n, abs_tol=1e-12)
    loss.backward()
    expected_grad = [c[3] / n for c in POLICY_CASES] + [0.0]
    np.testing.assert_allclose(logprobs.grad[0].numpy(), expected_grad, atol=1e-12)
    assert math.isclose(stats["pg_clipfrac"], 2 / n)


def test_policy_loss_at_ratio_one_is_unclipped_policy_gradient():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[1, 3:] = 0
    logprobs = (-torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    loss, stats = ppo.policy_loss(logprobs, logprobs.detach(), A, mask, 0.2)
    n = mask.sum()
    assert math.isclose(loss.item(), (-(A * mask).sum() / n).item(), abs_tol=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -A * mask / n, rtol=0, atol=1e-12)
    assert stats["pg_clipfrac"] == 0 and stats["approx_kl"] == 0


def test_value_loss_by_hand():
    # old value 0, clip 0.2: (vpred, return) -> 0.5 max((v - R)^2, (clip(v) - R)^2) and its gradient
    vpred = torch.tensor([[0.5, 0.1, 0.5, 9.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, stats = ppo.value_loss(vpred, torch.zeros_like(vpred), returns, mask, 0.2)
    # 0.5*0.64 (clipped 0.2 vs R=1 is worse), 0.5*0.81, 0.5*0.25 (clipped 0.2 vs R=0 is better)
    assert math.isclose(loss.item(), (0.32 + 0.405 + 0.125) / 3, abs_tol=1e-12)
    loss.backward()
    np.testing.assert_allclose(vpred.grad[0].numpy(), [0.0, -0.9 / 3, 0.5 / 3, 0.0], atol=1e-12)
    assert math.isclose(stats["vf_clipfrac"], 1 / 3)


def test_adaptive_kl_controller():
    cfg = train.Args()
    assert ppo.update_kl_coef(0.02, 100.0, cfg) == 0.02          # off by default
    cfg.adaptive_kl = True
    assert math.isclose(ppo.update_kl_coef(0.02, 12.0, cfg), 0.02 * 1.02)   # error clipped at +0.2
    assert math.isclose(ppo.update_kl_coef(0.02, 6.6, cfg), 0.02 * 1.01)    # error 0.1
    assert math.isclose(ppo.update_kl_coef(0.02, 0.0, cfg), 0.02 * 0.98)    # error clipped at -0.2


# ----------------------------------------------------------------------------- with models

TARGET = 32     # the stand-in reward counts response tokens with id < TARGET; prompts use ids >= TARGET


class TokenReward(torch.nn.Module):
    """Stand-in reward model: +1 per token with id < TARGET among the real tokens (B, T) -> (B,)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))   # gives the module a device
        self.score_eos = True                               # scores the response with its EOS, as ours

    def forward(self, tokens, mask):
        return ((tokens < TARGET) & mask.bool()).sum(-1).float()


def tiny_models(seed=0, dropout=0.0, lr=1e-2):
    torch.manual_seed(seed)
    cfg = llama.PRESETS["tiny"]
    policy = llama.Llama(cfg)
    lora.add_lora(policy, rank=8, alpha=16, dropout=dropout)
    value = reward.ValueModel(llama.Llama(cfg), rank=8, alpha=16, dropout=dropout)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0)
    return policy, value, optimizer


def prompts(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(TARGET, 256, (int(n),), generator=g).tolist() for n in torch.randint(2, 7, (B,), generator=g)]
    return llama.left_pad(seqs)


def rollout(policy, value, reward_model, prompts, mask, cfg, kl_coef, eos_id, ref_model=None, generator=None):
    """1. sample, then score: what train.py calls once per PPO step."""
    responses, rmask = ppo.generate_responses(policy, prompts, mask, cfg, eos_id, generator=generator)
    return ppo.score_rollout(policy, value, reward_model, prompts, mask, responses, rmask, cfg, kl_coef, eos_id,
                             ref_model=ref_model)


def small_cfg(**kw):
    base = dict(step_batch_size=8, micro_batch_size=4, max_new_tokens=6,
                generate_batch_size=16)
    return train.Args(**{**base, **kw})


def test_rollout_matches_per_sequence_forwards():
    policy, value, _ = tiny_models()
    for m in policy.modules():       # make the adapters matter so that pi_theta != pi_ref
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    torch.nn.init.normal_(value.value_head.weight, std=0.5)
    toks, mask = prompts(5)
    cfg = small_cfg(temperature=0.7)
    eos = 3
    batch, stats = rollout(policy, value, TokenReward(), toks, mask, cfg, kl_coef=0.02, eos_id=eos,
                               generator=torch.Generator().manual_seed(0))
    B, N = batch["responses"].shape
    assert batch["mask"].shape == (B, N) and batch["logprobs"].dtype == torch.float32
    base = llama.Llama(policy.cfg)
    base.load_state_dict({k: v for k, v in policy.state_dict().items() if "lora_" not in k})
    with torch.no_grad():
        for b in range(B):
            P = int(mask[b].sum())
            L = int(batch["mask"][b].sum())
            seq = torch.cat([toks[b, -P:], batch["responses"][b, :L]])[None]          # no padding at all
            logp = torch.log_softmax(policy(seq)[0, P - 1:-1] / 0.7, -1)
            ref = torch.log_softmax(base(seq)[0, P - 1:-1] / 0.7, -1)
            y = seq[0, P:]
            torch.testing.assert_close(batch["logprobs"][b, :L], logp[torch.arange(L), y], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch["ref_logprobs"][b, :L], ref[torch.arange(L), y], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch["values"][b, :L], value.values(seq)[0, P - 1:-1], atol=1e-5, rtol=0)
            assert batch["score"][b] == (y < TARGET).sum()
            assert (batch["logprobs"][b, L:] == 0).all() and (batch["advantages"][b, L:] == 0).all()
    assert stats["true_kl"] > 0 and stats["response_length"] == batch["mask"].sum(1).float().mean()
    # a separate reference model gives the same reference log-probs as the adapters-off policy
    batch2, _ = rollout(policy, value, TokenReward(), toks, mask, cfg, kl_coef=0.02, eos_id=eos,
                            ref_model=base, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch2["responses"], batch["responses"])
    torch.testing.assert_close(batch2["ref_logprobs"], batch["ref_logprobs"], atol=1e-5, rtol=0)


def test_reward_model_sharing_the_value_backbone_scores_without_value_adapters():
    policy, _, _ = tiny_models()
    rm = reward.RewardModel(llama.PRESETS["tiny"])
    toks, mask = prompts(4)
    cfg = small_cfg(temperature=0.0)
    with torch.no_grad():
        _, ref_stats = rollout(policy, reward.ValueModel(copy.deepcopy(rm).backbone), rm, toks, mask, cfg,
                                   0.02, eos_id=None)
    value = reward.ValueModel(rm.backbone, rank=4, alpha=8, dropout=0.0)   # one backbone for both
    for m in value.modules():
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.5)
    _, stats = rollout(policy, value, rm, toks, mask, cfg, 0.02, eos_id=None)
    assert stats["score"] == ref_stats["score"]


def test_no_eos_penalty_replaces_the_score():
    policy, value, _ = tiny_models()
    toks, mask = prompts(8)
    cfg = small_cfg(no_eos_penalty=-1.0, whiten_rewards=False, kl_coef=0.0)
    batch, stats = rollout(policy, value, TokenReward(), toks, mask, cfg, kl_coef=0.0, eos_id=None)
    assert stats["eos_fraction"] == 0 and (batch["score"] == -1.0).all()
    assert (batch["rewards"].sum(1) == -1.0).all()


def test_zero_advantages_and_value_loss_leave_models_unchanged():
    policy, value, optimizer = tiny_models(dropout=0.1)
    toks, mask = prompts(8)
    cfg = small_cfg()
    batch, _ = rollout(policy, value, TokenReward(), toks, mask, cfg, kl_coef=0.02, eos_id=None)
    # zero advantages; the zero-initialized value head predicts 0 = the returns, so both losses are flat
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    batch["returns"] = torch.zeros_like(batch["returns"])
    before = [p.detach().clone() for m in (policy, value) for p in m.parameters()]
    stats = ppo.ppo_update(policy, value, optimizer, None, batch, cfg)
    after = [p for m in (policy, value) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert stats["loss"] == 0 and stats["grad_norm"] == 0
    # the same update with the real advantages does move the adapters (the check above can fail)
    batch, _ = rollout(policy, value, TokenReward(), toks, mask, cfg, kl_coef=0.02, eos_id=None)
    ppo.ppo_update(policy, value, optimizer, None, batch, cfg)
    assert not all(torch.equal(a, b) for a, b in zip(before, [p for m in (policy, value) for p in m.parameters()]))


def test_micro_batch_accumulation_equals_one_step_batch():
    policy, value, _ = tiny_models()
    toks, mask = prompts(8)
    cfg = small_cfg(step_batch_size=8, ppo_epochs=1)
    batch, _ = rollout(policy, value, TokenReward(), toks, mask, cfg, kl_coef=0.02, eos_id=5,
                           generator=torch.Generator().manual_seed(1))
    results = []
    for micro in (8, 3):             # one forward, or accumulation over 3 + 3 + 2 samples
        p, v = copy.deepcopy(policy), copy.deepcopy(value)
        params = [x for m in (p, v) for x in m.parameters() if x.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        cfg.micro_batch_size = micro
        stats = ppo.ppo_update(p, v, opt, None, batch, cfg, generator=torch.Generator().manual_seed(0))
        results.append(([x.detach() for x in params], stats))
    (p8, s8), (p3, s3) = results
    for a, b in zip(p8, p3):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert math.isclose(s8["loss"], s3["loss"], rel_tol=1e-5)


def test_nan_loss_raises_naming_the_step():
    policy, value, optimizer = tiny_models()
    toks, mask = prompts(8)
    cfg = small_cfg()
    batch, _ = rollout(policy, value, TokenReward(), toks, mask, cfg, kl_coef=0.02, eos_id=None)
    batch["advantages"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 0, optimizer step"):
        ppo.ppo_update(policy, value, optimizer, None, batch, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(divergences.ESTIMATORS))
def test_ppo_raises_a_known_reward(estimator):
    # A random tiny policy with LoRA; reward +1 per response token with id < 32 (1/8 of the vocabulary).
    # The output layer starts at std 0.3 instead of 0.02 so that the logits have a usable range (with 0.02
    # a unit hidden state moves a logit by at most ~0.2 and no policy can favour the target tokens).
    policy, value, optimizer = tiny_models(seed=1, lr=1e-2)
    torch.nn.init.normal_(policy.output.weight, std=0.3)
    cfg = small_cfg(estimator=estimator, max_new_tokens=8, step_batch_size=8, micro_batch_size=8)
    g = torch.Generator().manual_seed(1)
    scores = []
    for step in range(15):
        toks, mask = prompts(16, seed=100 + step)
        batch, stats = rollout(policy, value, TokenReward(), toks, mask, cfg, cfg.kl_coef, eos_id=None,
                                   generator=g)
        ppo.ppo_update(policy, value, optimizer, None, batch, cfg, generator=g)
        scores.append(stats["score"])
    # The score of one response is a count over 8 tokens: ~1 +- 1 at the start, so a mean over 3 rollouts
    # (48 responses) has a standard error of ~0.15. Requiring a gain of 1.0 is ~7 standard errors.
    gain = sum(scores[-3:]) / 3 - sum(scores[:3]) / 3
    assert gain > 1.0, [round(s, 2) for s in scores]
