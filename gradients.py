"""What each penalty does to the gradient: exact expectations on a tiny autoregressive policy.

divergences.py says what each per-token penalty D_t = D(log pi_theta(y_t|y_<t), log pi_ref(y_t|y_<t))
estimates in value. Training uses its gradient, and that depends on where D is placed:

- in the reward (paper Eq. 3, as PPO uses it): r_t = -beta D_t is computed at rollout and enters the
  return; the policy gradient reaches theta only through log pi_theta, by the score function, with the
  reward-to-go:  g = E_y[ sum_t grad log pi_theta(y_t|y_<t) * sum_{s>=t} D_s ],  D held constant;
- as a loss (GRPO adds k3 = bregman to its loss; TRL's kl_estimator only picks the estimator that goes
  into the reward): beta * D_t is added to the loss and differentiated directly, the sampled y held
  fixed:  g = E_y[ sum_t grad D_t ].

The two add up to grad E_y[sum_t D_t] (through the sampling + through D). Minimizing beta * penalty
moves theta along -g, so an ideal penalty has g = grad KL(pi_theta || pi_ref) of the whole sequence
distribution; the JS rows are held to grad JS of the sequence distributions, which no per-token value
estimates when T > 1 (JS has no chain rule), so the table also prints cos(grad JS, grad KL).

The policy is tabular: one row of logits per prefix y_<t, over V tokens for T steps; all V^T sequences
are enumerated, every expectation over y ~ pi_theta is an exact float64 sum weighted by pi_theta(y), and
gradients come from autograd. See Schulman (2020), "Approximating KL divergence", and Tang & Munos
(2025), "On a few pitfalls in KL divergence gradient estimation for RL", arXiv 2506.09477.

The table assumes gamma = lambda = 1 (undiscounted reward-to-go, no bootstrapping); ppo.py's GAE
defaults to lambda = 0.95, which bootstraps from the value model, so there the table holds only as far
as the values are exact. Run `python -m tools.tables --gradients` for the table
"What the penalties do to the gradient"; tests/test_gradients.py asserts the exact identities.
"""
import itertools

import torch
import torch.nn.functional as F

import divergences as D

AGAINST = {name: "JS" if D.TARGETS[name] == "JS" else "KL" for name in D.ESTIMATORS}   # grad of what


def sequences(V, T):
    """All V^T sequences y, (N, T) with N = V^T, in lexicographic order."""
    return torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long)


def prefix_rows(y, V):
    """Row of the logit table that holds pi(. | y_<t), for every sequence and step: (N, T) -> (N, T).
    The table lists prefixes by length, then as base-V numbers: the V^t prefixes of length t start at
    row 1 + V + ... + V^(t-1)."""
    rows = torch.zeros_like(y)
    start, code = 0, torch.zeros_like(y[:, 0])   # code = y_<t as a base-V number, (N,)
    for t in range(y.shape[1]):
        rows[:, t] = start + code
        start, code = start + V ** t, code * V + y[:, t]
    return rows


def token_logprobs(logits, y):
    """log pi(y_t | y_<t) of every token of every sequence: logits (sum_t V^t, V), y (N, T) -> (N, T)."""
    logp = F.log_softmax(logits, dim=-1)[prefix_rows(y, logits.shape[-1])]     # (N, T, V)
    return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def grad(scalar, logits):
    if not scalar.requires_grad:                    # `none` does not depend on theta: its gradient is 0
        return torch.zeros_like(logits)
    return torch.autograd.grad(scalar, logits)[0]


# ---- the targets: grad KL and grad JS of the sequence distributions -----------------------------------

def true_divergence(which, logits, ref_logits, y):
    """KL(pi_theta || pi_ref) or JS of the distributions over whole sequences: the V^T sequences as the
    outcomes of one categorical, log pi(y) = sum_t log pi(y_t|y_<t)."""
    logp, logq = token_logprobs(logits, y).sum(-1), token_logprobs(ref_logits, y).sum(-1)   # (N,)
    fn = {"KL": D.kl_true, "JS": D.js_true}[which]
    return fn(logp, logq, dtype=torch.float64)       # log-probs are logits: their log_softmax is themselves


# ---- the two placements -----------------------------------------------------------------------------

def penalties(name, logits, ref_logits, y):
    """D_t of every token of every sequence, (N, T), differentiable in the policy's logits."""
    return D.get_estimator(name)(token_logprobs(logits, y), token_logprobs(ref_logits, y))


def score_gradient(logits, y, returns):
    """E_y[sum_t grad log pi_theta(y_t|y_<t) returns_t] for returns (N, T) held constant: the expectation
    of the policy-gradient estimator, y ~ pi_theta summed exactly."""
    logp = token_logprobs(logits, y)                        # (N, T)
    w = logp.sum(-1).exp().detach()                         # (N,) pi_theta(y): sampling is not differentiated
    return grad((w * (logp * returns.detach()).sum(-1)).sum(), logits)


def reward_to_go(d):
    """sum_{s>=t} D_s, (N, T) -> (N, T): the return of step t with gamma = 1 and no other reward."""
    return d.flip(-1).cumsum(-1).flip(-1)


def in_reward(name, logits, ref_logits, y):
    """Expected gradient of the penalty placed in the reward (Eq. 3): score function, reward-to-go. It is
    the expectation of PPO's first, on-policy step (ratio 1, no clipping) with gamma = lambda = 1; a value
    baseline changes its variance, not its expectation."""
    return score_gradient(logits, y, reward_to_go(penalties(name, logits, ref_logits, y).detach()))


def as_loss(name, logits, ref_logits, y):
    """Expected gradient of the penalty as a loss term: E_y[sum_t grad D_t], y ~ pi_theta held fixed."""
    w = token_logprobs(logits, y).sum(-1).exp().detach()     # (N,) pi_theta(y)
    return grad((w * penalties(name, logits, ref_logits, y).sum(-1)).sum(), logits)

