"""Per-token divergence penalties (paper Table 1, Eq. 3) and true divergences over the vocabulary.

In PPO the reward of response token t is r_t = -beta * D(log pi_theta(y_t), log pi_ref(y_t)) (Eq. 3),
where y_t ~ pi_theta was sampled by the policy and only the two log-probs of that one token are kept.
Each D below is a single-sample Monte-Carlo estimator; its docstring says what it estimates in
expectation under y ~ pi_theta and how biased it is (p = pi_theta, q = pi_ref, KL = KL(p || q),
JS = 1/2 KL(p || m) + 1/2 KL(q || m) with m = (p + q) / 2). See Schulman (2020), "Approximating KL
divergence", http://joschu.net/blog/kl-approx.html (k1 = kl, k2 = squared, k3 = bregman).

kl_true / js_true sum over the whole vocabulary from two logit tensors (paper Fig. 2), in fp32,
chunked over B*T rows so a (B, T, 32000) batch never materializes more than chunk_size rows at once.

Run `python -m tools.tables --divergences` to print the table "What the penalties estimate" (exact
expectations and standard deviations by summing over a 1,000-token vocabulary; tests/test_divergences.py
asserts the same quantities); `python -m tools.tables` adds gradients.py's table of what each penalty
does to the gradient.
"""
import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def _check(logprobs, ref_logprobs):
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"divergence: logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} must have the same shape")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)   # fp32 (or fp64), never bf16
    return logprobs.to(dtype), ref_logprobs.to(dtype)


# ---- per-token estimators f(logprobs, ref_logprobs), elementwise on any shape ----------------------

def kl(logprobs, ref_logprobs):
    """E_p = KL exactly (unbiased, Schulman's k1); std ~ sqrt(2 KL), negative about half the time."""
    logp, logq = _check(logprobs, ref_logprobs)
    return logp - logq


def clamped_kl(logprobs, ref_logprobs):
    """E_p = KL + E_p[max(0, log q/p)] >= KL: biased upward (AlpacaFarm's choice)."""
    logp, logq = _check(logprobs, ref_logprobs)
    return (logp - logq).clamp_min(0.0)


def bregman(logprobs, ref_logprobs):
    """E_p = KL exactly (unbiased, k3, since E_p[q/p] = 1 when p > 0 wherever q > 0, as for any softmax
    policy); >= 0 and much lower variance when q ~ p, but heavier-tailed (q/p) than kl when far."""
    logp, logq = _check(logprobs, ref_logprobs)
    d = logq - logp                        # log(q/p)
    return torch.expm1(d) - d              # q/p - 1 - log(q/p); expm1 keeps it >= 0 in fp32 near d = 0


def squared(logprobs, ref_logprobs):
    """E_p = 1/2 E_p[(log p/q)^2], an f-divergence; = KL - E_p[e^d - 1 - d - d^2/2] with d = log q/p,
    so it matches KL to second order (bias O(d^3)) and is biased for far pairs (k2)."""
    logp, logq = _check(logprobs, ref_logprobs)
    return 0.5 * (logp - logq) ** 2


def js(logprobs, ref_logprobs):
    """The paper's Table 1 form; E_p = 1/2 E_p[log(max(p, q) / m)], NOT JS: between ln2/2 and 1/2 of
    A = E_p[|p - q| / (p + q)], about TV(p, q)/2 (first order) for close pairs, JS/2 for disjoint ones."""
    logp, logq = _check(logprobs, ref_logprobs)
    # with t = log(q/p), h = tanh(t/2): log(p/m) = log(2/(1 + e^t)) = log1p(-h) and log(q/m) = log1p(h),
    # exactly 0 at p = q (logp - logaddexp(logp, logq) + ln2 would leave rounding of size ulp(|logp|))
    h = torch.tanh(0.5 * (logq - logp))
    return 0.5 * torch.log1p(-h).clamp_min(0.0) + 0.5 * torch.log1p(h).clamp_min(0.0)


def js_unbiased(logprobs, ref_logprobs):
    """E_p = JS exactly (same support condition as bregman): JS = E_p[1/2 log(p/m)] + E_q[1/2 log(q/m)]
    and E_q[g] = E_p[(q/p) g]; every sample is >= 0."""
    logp, logq = _check(logprobs, ref_logprobs)
    t = logq - logp                                       # log u, u = q/p
    # f(u) = 1/2 [log(p/m) + u log(q/m)] = 1/2 [log(2/(1+u)) + u log(2u/(1+u))] is convex with
    # f(1) = f'(1) = 0, so every sample is >= 0. Computed as 1/2 [u log(2 sigmoid(t)) + log(2 sigmoid(-t))],
    # with u log(...) = 0 when u = 0 (q = 0, t = -inf).
    u = torch.exp(t)
    direct = 0.5 * (torch.where(u > 0, u * (LN2 + F.logsigmoid(t)), 0.0) + LN2 + F.logsigmoid(-t))
    # near t = 0 the two terms cancel to first order; there use the series in h = tanh(t/2):
    # f = (1 + u)/4 * [(1+h) log(1+h) + (1-h) log(1-h)] = (1 + u)/4 * (h^2 + h^4/6 + h^6/15 + h^8/28 + ...),
    # truncated after h^8: relative error < 1e-12 for |t| < 0.1 (h < 0.05)
    h2 = torch.tanh(0.5 * t) ** 2
    series = 0.25 * (1 + u) * h2 * (1 + h2 * (1 / 6 + h2 * (1 / 15 + h2 / 28)))
    return torch.where(t.abs() < 0.1, series, direct)


def none(logprobs, ref_logprobs):
    """E_p = 0: no regularization (beta = 0 in effect); as a KL estimate its bias is -KL."""
    logp, _ = _check(logprobs, ref_logprobs)
    return torch.zeros_like(logp)


def negative_kl(logprobs, ref_logprobs):
    """E_p = -KL exactly: the paper's KL-maximizing probe (Sec. 4); penalizing it rewards divergence."""
    logp, logq = _check(logprobs, ref_logprobs)
    return logq - logp


ESTIMATORS = {"kl": kl, "clamped_kl": clamped_kl, "bregman": bregman, "squared": squared, "js": js,
              "js_unbiased": js_unbiased, "none": none, "negative_kl": negative_kl}
TARGETS = {"kl": "KL", "clamped_kl": "KL", "bregman": "KL", "squared": "KL", "js": "JS",
           "js_unbiased": "JS", "none": "0", "negative_kl": "-KL"}   # what each is meant to estimate


def get_estimator(name):
    if name not in ESTIMATORS:
        raise ValueError(f"unknown divergence estimator {name!r}; valid names: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


# ---- true divergences over the whole vocabulary ----------------------------------------------------

def _kl_rows(logp, logq):                      # (n, V) -> (n,); 0 log 0 = 0, p > 0 = q gives +inf
    return torch.where(logp > -math.inf, logp.exp() * (logp - logq), 0.0).sum(-1)


def _js_rows(logp, logq):                      # (n, V) -> (n,); finite (<= ln 2) for any supports
    logm = torch.logaddexp(logp, logq) - LN2
    kl_pm = torch.where(logp > -math.inf, logp.exp() * (logp - logm), 0.0).sum(-1)
    kl_qm = torch.where(logq > -math.inf, logq.exp() * (logq - logm), 0.0).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def _full_vocab(rows_fn, logits, ref_logits, mask, chunk_size, dtype):
    if logits.shape != ref_logits.shape:
        raise ValueError(f"divergence: logits {tuple(logits.shape)} and ref_logits "
                         f"{tuple(ref_logits.shape)} must have the same shape (B, T, V)")
    lead, V = logits.shape[:-1], logits.shape[-1]
    if mask is not None and tuple(mask.shape) != tuple(lead):
        raise ValueError(f"divergence: mask {tuple(mask.shape)} must match logits' leading dims {tuple(lead)}")
    flat, ref_flat = logits.reshape(-1, V), ref_logits.reshape(-1, V)          # (B*T, V)
    rows = torch.arange(flat.shape[0], device=logits.device)
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]          # padding rows are never computed (may hold -inf/NaN)
    out = torch.zeros(flat.shape[0], dtype=dtype, device=logits.device)        # (B*T,)
    for i in range(0, rows.numel(), chunk_size):
        idx = rows[i:i + chunk_size]
        logp = F.log_softmax(flat[idx].to(dtype), dim=-1)                       # (chunk, V)
        logq = F.log_softmax(ref_flat[idx].to(dtype), dim=-1)
        out[idx] = rows_fn(logp, logq)
    return out.reshape(lead)


def kl_true(logits, ref_logits, mask=None, chunk_size=256, dtype=torch.float32):
    """KL(pi_theta || pi_ref) per position from logits (B, T, V) -> (B, T), 0 where mask == 0."""
    return _full_vocab(_kl_rows, logits, ref_logits, mask, chunk_size, dtype)


def js_true(logits, ref_logits, mask=None, chunk_size=256, dtype=torch.float32):
    """JS(pi_theta, pi_ref) per position from logits (B, T, V) -> (B, T), 0 where mask == 0."""
    return _full_vocab(_js_rows, logits, ref_logits, mask, chunk_size, dtype)


def masked_mean(values, mask):
    """Mean of values over positions where mask == 1 (0 if the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)

