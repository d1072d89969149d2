"""What each per-token penalty estimates, checked against exact sums over the vocabulary (float64 numpy),
Monte-Carlo means (tolerance K_SE standard errors), and Schulman's Gaussian example."""
import math

import numpy as np
import pytest
import torch

import divergences as D
from tools import tables

K_SE = 5.0           # Monte-Carlo tolerance in standard errors: two-sided normal tail 5.7e-7 per check
SCALES = [0.01, 0.025, 0.05, 0.1, 0.5, 2.0, 4.0]   # reference logits = policy logits + scale * noise
CLOSE = [s for s in SCALES if s <= 0.1]
LN2 = math.log(2.0)


def np_dists(scale, seed=0):
    logp, logq = tables.demo_pair(scale, seed=seed)
    return logp, logq, logp.exp().numpy(), logq.exp().numpy()


def np_kl(p, q):          # independent float64 reference, 0 log 0 = 0
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def np_js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)


def np_log_softmax(x):
    x = x.astype(np.float64)
    mx = np.max(x, axis=-1, keepdims=True)
    return x - mx - np.log(np.sum(np.exp(x - mx), axis=-1, keepdims=True))


def moments(name, logp, logq):
    mean, var = tables.estimator_moments(name, logp, logq)
    return mean.item(), var.item()


def test_formulas_match_table1_float64():
    # each estimator vs its formula written literally in numpy (paper Table 1, p = pi_theta, q = pi_ref)
    g = torch.Generator().manual_seed(10)
    logp, logq = -12 * torch.rand(10_000, generator=g, dtype=torch.float64), -12 * torch.rand(10_000, generator=g, dtype=torch.float64)
    keep = (logq - logp).abs() > 1e-2          # keeps the plain js_unbiased formula free of cancellation
    logp, logq = logp[keep], logq[keep]
    lp, lq = logp.numpy(), logq.numpy()
    p, q = np.exp(lp), np.exp(lq)
    m = (p + q) / 2
    literal = {"kl": lp - lq, "clamped_kl": np.maximum(0, lp - lq), "bregman": q / p - 1 - np.log(q / p),
               "squared": 0.5 * (lp - lq) ** 2, "none": 0 * lp, "negative_kl": lq - lp,
               "js": 0.5 * np.maximum(0, lp - np.log(m)) + 0.5 * np.maximum(0, lq - np.log(m)),
               "js_unbiased": 0.5 * np.log(p / m) + 0.5 * (q / p) * np.log(q / m)}
    assert set(literal) == set(D.ESTIMATORS)
    for name, want in literal.items():
        np.testing.assert_allclose(D.ESTIMATORS[name](logp, logq).numpy(), want, rtol=1e-9, atol=1e-12, err_msg=name)


# ---- exact expectations (sum over the vocabulary weighted by p) ------------------------------------

@pytest.mark.parametrize("scale", SCALES)
def test_exact_expectations(scale):
    logp, logq, p, q = np_dists(scale)
    kl, js = np_kl(p, q), np_js(p, q)
    assert kl > 0 and js > 0
    for name, target in [("kl", kl), ("bregman", kl), ("js_unbiased", js), ("negative_kl", -kl), ("none", 0.0)]:
        mean, _ = moments(name, logp, logq)
        assert mean == pytest.approx(target, rel=1e-9, abs=1e-15), f"{name}: E_p = {mean} vs {target}"
    # clamped_kl: E_p = KL + E_p[max(0, log q/p)] >= KL
    mean, _ = moments("clamped_kl", logp, logq)
    excess = float(np.sum(p * np.maximum(0.0, np.log(q / p))))
    assert mean == pytest.approx(kl + excess, rel=1e-9) and mean >= kl
    # squared: E_p = KL - E_p[e^d - 1 - d - d^2/2], d = log q/p (exact, because E_p[e^d] = 1), and the
    # Taylor remainder bounds the bias: |e^d - 1 - d - d^2/2| <= |d|^3 e^max(d, 0) / 6
    d = np.log(q / p)
    remainder = np.sum(p * (np.exp(d) - 1 - d - d ** 2 / 2))
    mean, _ = moments("squared", logp, logq)
    assert mean == pytest.approx(kl - remainder, rel=1e-9)
    assert abs(mean - kl) <= np.sum(p * np.abs(d) ** 3 * np.exp(np.maximum(d, 0))) / 6


def test_squared_second_order_close_and_biased_far():
    rel = {}
    for s in SCALES:
        logp, logq, p, q = np_dists(s)
        kl = np_kl(p, q)
        d = np.log(q / p)
        rel[s] = (moments("squared", logp, logq)[0] - kl) / kl
        bound = np.sum(p * np.abs(d) ** 3 * np.exp(np.maximum(d, 0))) / 6 / kl   # O(s): third over second order
        if s in CLOSE:
            assert abs(rel[s]) <= bound <= 3.0 * s, f"scale {s}: relative bias {rel[s]}, bound {bound}"
    assert max(abs(rel[s]) for s in CLOSE) < 2e-3        # within 0.2% of KL when KL < 0.005
    assert rel[2.0] > 0.5 and rel[4.0] > 3.0             # far: squared overestimates KL (x1.95, x4.7)


def test_clamped_kl_at_least_kl_samplewise():
    g = torch.Generator().manual_seed(1)
    logp, logq = -30 * torch.rand(10_000, generator=g), -30 * torch.rand(10_000, generator=g)
    assert torch.all(D.clamped_kl(logp, logq) >= D.kl(logp, logq))


def test_bregman_lower_variance_when_close_not_when_far():
    for s in SCALES:
        logp, logq, _, _ = np_dists(s)
        var_kl, var_bregman = moments("kl", logp, logq)[1], moments("bregman", logp, logq)[1]
        if s <= 0.5:
            assert var_bregman < var_kl, f"scale {s}: {var_bregman} vs {var_kl}"
        else:   # heavy tail of q/p: k3 is not uniformly better
            assert var_bregman > var_kl, f"scale {s}: {var_bregman} vs {var_kl}"
    logp, logq, _, _ = np_dists(0.1)
    assert moments("bregman", logp, logq)[1] < 0.01 * moments("kl", logp, logq)[1]   # O(s^4) vs O(s^2)


# ---- Monte-Carlo: sample y ~ p and average ---------------------------------------------------------

@pytest.mark.parametrize("scale", [0.1, 0.5, 2.0])
def test_monte_carlo_means(scale):
    logp, logq, p, q = np_dists(scale)
    g = torch.Generator().manual_seed(2)
    y = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)   # (N,) samples of pi_theta
    for name in D.ESTIMATORS:
        vals = D.ESTIMATORS[name](logp[y], logq[y])
        exact, var = moments(name, logp, logq)
        se = vals.std().item() / math.sqrt(len(y))
        assert abs(vals.mean().item() - exact) <= K_SE * se + 1e-12, f"{name}: MC {vals.mean()} vs {exact}"
        if name in ("kl", "bregman"):
            assert abs(vals.mean().item() - np_kl(p, q)) <= K_SE * se
        if name == "js_unbiased":
            assert abs(vals.mean().item() - np_js(p, q)) <= K_SE * se


# ---- invariants ------------------------------------------------------------------------------------

def test_all_zero_when_equal():
    logp = torch.log_softmax(torch.randn(4, 1000, generator=torch.Generator().manual_seed(3)), -1)
    for name, f in D.ESTIMATORS.items():
        assert torch.all(f(logp, logp) == 0), name
    logits = torch.randn(2, 3, 1000)
    assert torch.all(D.kl_true(logits, logits) == 0)
    assert D.js_true(logits, logits).abs().max() < 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonnegative(dtype):
    g = torch.Generator().manual_seed(4)
    logp = -30 * torch.rand(200_000, generator=g, dtype=dtype)
    logq = torch.cat([-30 * torch.rand(100_000, generator=g, dtype=dtype),          # anywhere
                      logp[100_000:] + 1e-3 * torch.randn(100_000, generator=g, dtype=dtype)])  # q ~ p
    logq[:10] = -math.inf                                                            # reference masks y
    for name in ("bregman", "squared", "clamped_kl", "js", "js_unbiased"):
        vals = D.ESTIMATORS[name](logp, logq)
        assert not vals.isnan().any(), name
        assert vals.min() >= 0, f"{name}: min {vals.min()}"


def test_js_unbiased_numerics_match_float64():
    # the fp32 series/direct split vs the plain formula in float64: 1/2 [log(p/m) + (q/p) log(q/m)]
    t = torch.cat([torch.linspace(-1, 1, 100_001), torch.linspace(-60, 60, 10_001)])   # t = log q/p
    got = D.js_unbiased(torch.zeros_like(t), t).double().numpy()
    u = np.exp(t.double().numpy())
    m = (1 + u) / 2
    want = 0.5 * (np.log(1 / m) + u * np.log(u / m))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)   # fp32 cancellation at |t| = 0.1: ~5e-5


# ---- Schulman (2020), "Approximating KL divergence": samples from N(0, 1), reference N(mu, 1) -------
# His table (bias/true, stdev/true), from a 10^7-sample Monte Carlo. The closed forms below reproduce
# every entry to its last printed digit (his 0.002 is the exact 0.0025 seen through sampling noise).
PUBLISHED = {0.1: {"kl": (0, 20), "squared": (0.002, 1.42), "bregman": (0, 1.42)},
             1.0: {"kl": (0, 2), "squared": (0.25, 1.73), "bregman": (0, 1.7)}}
ULP = {0.1: {"kl": (1, 1), "squared": (0.001, 0.01), "bregman": (1, 0.01)},      # one unit of his last digit
       1.0: {"kl": (1, 1), "squared": (0.01, 0.01), "bregman": (1, 0.1)}}


def gaussian_exact(mu):
    """Closed forms, log r = log q/p = mu x - mu^2/2 ~ N(-mu^2/2, mu^2) for x ~ N(0, 1)."""
    return {"kl": (mu ** 2 / 2, mu),
            "squared": (mu ** 2 / 2 + mu ** 4 / 8, 0.5 * mu ** 2 * math.sqrt(2 + mu ** 2)),
            "bregman": (mu ** 2 / 2, math.sqrt(math.exp(mu ** 2) - 1 - mu ** 2))}


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_schulman_gaussian(mu):
    true_kl = mu ** 2 / 2
    exact = gaussian_exact(mu)
    # 1. quadrature of the estimators themselves (float64, step 1e-3 on [-20, 20]) = closed forms
    x = torch.linspace(-20, 20, 40_001, dtype=torch.float64)
    w = torch.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi) * (x[1] - x[0])
    logp, logq = -x ** 2 / 2, -(x - mu) ** 2 / 2          # the 1/sqrt(2 pi) cancels in every estimator
    for name, (mean, std) in exact.items():
        f = D.ESTIMATORS[name](logp, logq)
        m = (w * f).sum().item()
        s = math.sqrt((w * (f - m) ** 2).sum().item())
        assert m == pytest.approx(mean, rel=1e-9) and s == pytest.approx(std, rel=1e-9), name
        # 2. his published table, to one unit of its last printed digit
        bias_pub, std_pub = PUBLISHED[mu][name]
        tol_bias, tol_std = ULP[mu][name]
        assert abs((mean - true_kl) / true_kl - bias_pub) <= tol_bias * 1.0001, name
        assert abs(std / true_kl - std_pub) <= tol_std * 1.0001, name
    # 3. Monte Carlo with 10^6 samples: mean and variance within K_SE standard errors
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(1_000_000, generator=g, dtype=torch.float64)
    for name, (mean, std) in exact.items():
        f = D.ESTIMATORS[name](-xs ** 2 / 2, -(xs - mu) ** 2 / 2)
        n = len(f)
        se_mean = f.std().item() / math.sqrt(n)
        c = f - f.mean()
        se_var = math.sqrt(((c ** 4).mean() - (c ** 2).mean() ** 2).item() / n)
        assert abs(f.mean().item() - mean) <= K_SE * se_mean, name
        assert abs(f.var().item() - std ** 2) <= K_SE * se_var, name


# ---- what the paper's js estimates -----------------------------------------------------------------

def test_paper_js_is_not_js():
    ratio = {}
    for s in SCALES:
        logp, logq, p, q = np_dists(s)
        e_js, js = moments("js", logp, logq)[0], np_js(p, q)
        # exact: js(y) = 1/2 log(max(p, q)/m) = 1/2 log(1 + x), x = |p - q|/(p + q) in [0, 1], and
        # x ln2 <= log(1 + x) <= x, so with A = E_p[x]: (ln2/2) A <= E_p[js] <= A/2 <= TV(p, q)
        a = float(np.sum(p * np.abs(p - q) / (p + q)))
        tv = 0.5 * float(np.sum(np.abs(p - q)))
        assert LN2 / 2 * a <= e_js <= a / 2 <= tv, f"scale {s}"
        assert abs(e_js - js) > 0.25 * js, f"scale {s}: paper js is within 25% of JS"
        ratio[s] = e_js / js
        if s in CLOSE:   # first order in |p - q|: E_p[js] -> TV/2 while JS is second order
            assert e_js == pytest.approx(tv / 2, rel=0.05), f"scale {s}"
    assert ratio[0.01] > 100 and ratio[0.1] > 10 and ratio[4.0] < 0.6   # over- then under-estimates JS
    # disjoint supports: JS = ln 2 and E_p[js] = ln2 / 2 exactly
    logits = torch.full((2, 100), -math.inf, dtype=torch.float64)
    logits[0, :50], logits[1, 50:] = 0.0, 0.0
    logp, logq = torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)
    assert D.js_true(logits[0], logits[1], dtype=torch.float64).item() == pytest.approx(LN2)
    assert moments("js", logp, logq)[0] == pytest.approx(LN2 / 2)


# ---- true KL / JS from logits ----------------------------------------------------------------------

def random_logits(seed, B=3, T=5, V=300):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, V, generator=g)
    ref_logits = logits + torch.randn(B, T, V, generator=g)
    return logits, ref_logits


def np_true(logits, ref_logits):
    lp, lq = np_log_softmax(logits.double().numpy()), np_log_softmax(ref_logits.double().numpy())
    p, q = np.exp(lp), np.exp(lq)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (lp - lq), 0.0).sum(-1)
        m = 0.5 * (p + q)
        js = 0.5 * np.where(p > 0, p * np.log(p / m), 0.0).sum(-1) + 0.5 * np.where(q > 0, q * np.log(q / m), 0.0).sum(-1)
    return kl, js


def test_true_divergences_match_float64_numpy():
    logits, ref_logits = random_logits(6)
    logits[..., :20] = -math.inf                 # tokens masked in both
    logits[0, 0, 20:40] = -math.inf              # masked in the policy only: finite KL
    ref_logits[..., :20] = -math.inf
    kl_np, js_np = np_true(logits, ref_logits)
    for dtype, tol in [(torch.float32, 2e-5), (torch.float64, 1e-12)]:   # fp32: |log p| ~ 10, eps 6e-8
        kl, js = D.kl_true(logits, ref_logits, dtype=dtype), D.js_true(logits, ref_logits, dtype=dtype)
        assert kl.shape == (3, 5) and kl.dtype == dtype and not kl.isnan().any() and not js.isnan().any()
        np.testing.assert_allclose(kl.numpy(), kl_np, rtol=tol, atol=tol)
        np.testing.assert_allclose(js.numpy(), js_np, rtol=tol, atol=tol)
    # reference masks a token the policy can emit: KL = +inf (true value), JS stays finite, no NaN
    ref_logits[1, 2, 50] = -math.inf
    kl, js = D.kl_true(logits, ref_logits), D.js_true(logits, ref_logits)
    assert torch.isinf(kl[1, 2]) and torch.isfinite(kl).sum() == 14 and torch.isfinite(js).all()


def test_true_divergences_bf16():
    logits, ref_logits = random_logits(7)
    logits, ref_logits = logits.bfloat16(), ref_logits.bfloat16()
    kl, js = D.kl_true(logits, ref_logits), D.js_true(logits, ref_logits)
    assert kl.dtype == torch.float32 and torch.isfinite(kl).all() and torch.isfinite(js).all()
    kl_np, js_np = np_true(logits.float(), ref_logits.float())     # the same bf16 values, in float64
    np.testing.assert_allclose(kl.numpy(), kl_np, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(js.numpy(), js_np, rtol=2e-5, atol=2e-5)


def test_chunking_and_mask():
    logits, ref_logits = random_logits(8, B=4, T=6, V=500)
    full = D.kl_true(logits, ref_logits, chunk_size=10 ** 6)
    for chunk in (1, 5, 24):
        assert torch.equal(D.kl_true(logits, ref_logits, chunk_size=chunk), full)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, :3] = 0                               # left padding
    mask[2, :] = 0
    logits[mask == 0] = float("nan")              # whatever sits on padding is never read
    for fn in (D.kl_true, D.js_true):
        unmasked = fn(logits.nan_to_num(0.0), ref_logits)
        got = fn(logits, ref_logits, mask=mask, chunk_size=7)
        assert torch.equal(got[mask == 1], unmasked[mask == 1]) and torch.all(got[mask == 0] == 0)
        assert D.masked_mean(got, mask).item() == pytest.approx(unmasked[mask == 1].mean().item(), rel=1e-6)


# ---- errors, shapes, dtypes ------------------------------------------------------------------------

def test_errors():
    with pytest.raises(ValueError, match="unknown divergence estimator 'kl2'.*bregman.*js_unbiased"):
        D.get_estimator("kl2")
    assert D.get_estimator("js") is D.js
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        D.ESTIMATORS["kl"](torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        D.kl_true(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="mask"):
        D.js_true(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), mask=torch.ones(2, 1))


def test_elementwise_any_shape_fp32_out():
    g = torch.Generator().manual_seed(9)
    logp, logq = -5 * torch.rand(2, 3, 4, generator=g), -5 * torch.rand(2, 3, 4, generator=g)
    for name, f in D.ESTIMATORS.items():
        out = f(logp, logq)
        assert out.shape == (2, 3, 4)
        assert torch.equal(out.flatten(), f(logp.flatten(), logq.flatten())), name
        assert torch.equal(out[1, 2], f(logp[1, 2], logq[1, 2])), name
        assert f(logp.bfloat16(), logq.bfloat16()).dtype == torch.float32, name


# ---- the README table "What the penalties estimate" (python -m tools.tables) ---------------------

def test_readme_table():
    rows = {(pair, name): r for pair, name, *r in tables.divergence_table()}
    # (target value, E_p[f], std) as printed in the README, to the printed precision
    printed = {("close", "kl"): (0.00475, 0.00475, 0.0975), ("close", "bregman"): (0.00475, 0.00475, 0.0069),
               ("close", "squared"): (0.00475, 0.00476, 0.0069), ("close", "js"): (0.00119, 0.01899, 0.0137),
               ("close", "js_unbiased"): (0.00119, 0.00119, 0.0017), ("close", "clamped_kl"): (0.00475, 0.04155, 0.0579),
               ("medium", "kl"): (0.11945, 0.11945, 0.4873), ("medium", "bregman"): (0.11945, 0.11945, 0.1849),
               ("medium", "squared"): (0.11945, 0.12587, 0.1804), ("medium", "js"): (0.02909, 0.08571, 0.0547),
               ("medium", "js_unbiased"): (0.02909, 0.02909, 0.0498), ("medium", "clamped_kl"): (0.11945, 0.26167, 0.3211),
               ("far", "kl"): (1.98458, 1.98458, 1.9492), ("far", "bregman"): (1.98458, 1.98458, 4.9526),
               ("far", "squared"): (1.98458, 3.86900, 4.7079), ("far", "js"): (0.34077, 0.24855, 0.0993),
               ("far", "js_unbiased"): (0.34077, 0.34077, 1.6522), ("far", "clamped_kl"): (1.98458, 2.13743, 1.7004)}
    for key, (target, mean, std) in printed.items():
        _, got_target, got_mean, _, got_std = rows[key]
        assert abs(got_target - target) <= 5e-6 and abs(got_mean - mean) <= 5e-6 and abs(got_std - std) <= 5e-5, key
