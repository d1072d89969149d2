"""
The README's two tables of the penalties, from exact sums (no sampling), on fixed demo pairs of distributions.

    python -m tools.tables                  # both tables
    python -m tools.tables --divergences    # "What the penalties estimate" (divergences.py)
    python -m tools.tables --gradients      # "What the penalties do to the gradient" (gradients.py)

What the penalties estimate: each estimator's exact expectation E_p[f], its bias against the divergence it is meant
to estimate and its standard deviation, by summing over a 1,000-token vocabulary (estimator_moments).
What they do to the gradient: for a tabular policy (V = 4 tokens, T = 3 steps, all V^T sequences summed), each
penalty in the reward and as a loss, compared with grad KL (grad JS for the JS rows) of the sequence distributions.
tests/test_divergences.py and tests/test_gradients.py assert the numbers printed.
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130

import sys

import torch
import torch.nn.functional as F

import divergences as D
import gradients as G
from support import config, exits

DEMO_SCALES = {"close": 0.1, "medium": 0.5, "far": 2.0}   # true KL ~ 0.005, ~ 0.1, ~ 1.6 nats
PLACEMENTS = ("reward", "loss")


# ---- the demo pairs ------------------------------------------------------------------------------------

def demo_pair(scale, V=1000, seed=0):
    """A fixed pair of categorical distributions: policy logits ~ 2 N(0, 1), reference logits =
    policy logits + scale * N(0, 1). Returns float64 log-probs (logp, logq), each (V,)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(V, generator=g, dtype=torch.float64)
    ref_logits = logits + scale * torch.randn(V, generator=g, dtype=torch.float64)
    return F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)


def demo_policy(scale, V=4, T=3, seed=0):
    """A fixed pair of tabular policies over V tokens and T steps: policy logits ~ 2 N(0, 1), reference
    logits = policy logits + scale * N(0, 1). Returns float64 (logits, ref_logits), each (sum_t V^t, V),
    the policy's with requires_grad."""
    g = torch.Generator().manual_seed(seed)
    n = sum(V ** t for t in range(T))
    logits = 2.0 * torch.randn(n, V, generator=g, dtype=torch.float64)
    ref_logits = logits + scale * torch.randn(n, V, generator=g, dtype=torch.float64)
    return logits.requires_grad_(), ref_logits


# ---- what the penalties estimate -----------------------------------------------------------------------

def estimator_moments(estimator, logp, logq):
    """Exact mean and variance of estimator(log p(y), log q(y)) under y ~ p, summing over the last dim.
    logp, logq: (..., V) normalized log-probs. Tokens with p = 0 are never sampled and contribute 0."""
    f = D.get_estimator(estimator) if isinstance(estimator, str) else estimator
    p = logp.exp()
    vals = torch.where(p > 0, f(logp, logq), 0.0)                 # (..., V)
    mean = (p * vals).sum(-1)
    var = (p * (vals - mean.unsqueeze(-1)) ** 2).sum(-1)
    return mean, var


def divergence_table(scales=DEMO_SCALES):
    """Rows (pair, estimator, target, target value, E_p[f], bias, std) for the demo pairs."""
    rows = []
    for pair, scale in scales.items():
        logp, logq = demo_pair(scale)
        true = {"KL": D.kl_true(logp, logq, dtype=torch.float64).item(),
                "JS": D.js_true(logp, logq, dtype=torch.float64).item()}
        true.update({"-KL": -true["KL"], "0": 0.0})
        for name in D.ESTIMATORS:
            mean, var = estimator_moments(name, logp, logq)
            target = true[D.TARGETS[name]]
            rows.append((pair, name, D.TARGETS[name], target, mean.item(), mean.item() - target, var.sqrt().item()))
    return rows


def print_divergence_table(scales=DEMO_SCALES):
    rows = divergence_table(scales)
    for pair in scales:
        kl_, js_ = (next(r[3] for r in rows if r[0] == pair and r[2] == t) for t in ("KL", "JS"))
        print(f"{pair}: reference logits = policy logits + {scales[pair]} N(0, 1); KL = {kl_:.5f}, JS = {js_:.5f}")
    print("\n| estimator | estimates | " + " | ".join(f"{p}: E_p[f] | bias | std" for p in scales) + " |")
    print("|---|---|" + "---:|" * 3 * len(scales))
    for name in D.ESTIMATORS:
        cells = []
        for pair, _, _, target, mean, bias, std in (r for r in rows if r[1] == name):
            bias = 0.0 if abs(bias) < 1e-12 else bias             # exact zeros, not rounding noise
            cells.append(f"{mean:.5f} | {bias:+.5f} | {std:.4f}")
        print(f"| {name} | {D.TARGETS[name]} | " + " | ".join(cells) + " |")


# ---- what they do to the gradient ----------------------------------------------------------------------

def compare(g, g_true):
    """(relative error ||g - g*|| / ||g*||, size ||g|| / ||g*||, cosine); cosine None when g = 0 (up to
    float64 rounding). Size and cosine determine the error: error^2 = 1 + size^2 - 2 size cosine."""
    g, g_true = g.flatten(), g_true.flatten()
    rel, size = ((g - g_true).norm() / g_true.norm()).item(), (g.norm() / g_true.norm()).item()
    if size <= 1e-12:
        return rel, size, None
    return rel, size, (g @ g_true / (g.norm() * g_true.norm())).item()


def gradient_table(scales=DEMO_SCALES, V=4, T=3):
    """Per pair: (KL, JS, cos(grad JS, grad KL)); rows (pair, estimator, placement, compared to, error,
    size, cosine)."""
    y = G.sequences(V, T)
    pairs, rows = {}, []
    for pair, scale in scales.items():
        logits, ref_logits = demo_policy(scale, V, T)
        value = {k: G.true_divergence(k, logits, ref_logits, y) for k in ("KL", "JS")}
        g_true = {k: G.grad(v, logits) for k, v in value.items()}
        pairs[pair] = (value["KL"].item(), value["JS"].item(), compare(g_true["JS"], g_true["KL"])[2])
        for name in D.ESTIMATORS:
            for placement, fn in (("reward", G.in_reward), ("loss", G.as_loss)):
                g = fn(name, logits, ref_logits, y)
                rows.append((pair, name, placement, G.AGAINST[name], *compare(g, g_true[G.AGAINST[name]])))
    return pairs, rows


def pull(g, g_kl):
    """How hard a penalty's expected gradient g pulls the policy toward the reference, per unit beta: its component
    along grad KL in units of grad KL, (g . grad KL) / |grad KL|^2. A step of -lr beta g lowers the sequence KL by
    lr beta |grad KL|^2 times this, to first order: 1 for `kl` in the reward, whatever the direction of the rest."""
    g, g_kl = g.flatten(), g_kl.flatten()
    return (g @ g_kl / (g_kl @ g_kl)).item()


def pull_table(scales=DEMO_SCALES, V=4, T=3):
    """{estimator: [pull in the reward, per pair]}: what sets each penalty's strength at one beta."""
    y, out = G.sequences(V, T), {name: [] for name in D.ESTIMATORS}
    for scale in scales.values():
        logits, ref_logits = demo_policy(scale, V, T)
        g_kl = G.grad(G.true_divergence("KL", logits, ref_logits, y), logits)
        for name in D.ESTIMATORS:
            out[name].append(pull(G.in_reward(name, logits, ref_logits, y), g_kl))
    return out


def print_gradient_table(scales=DEMO_SCALES, V=4, T=3):
    pairs, rows = gradient_table(scales, V, T)
    print(f"tabular policy, V = {V} tokens, T = {T} steps: exact sums over {V ** T} sequences")
    for pair, (kl_, js_, cos) in pairs.items():
        print(f"{pair}: reference logits = policy logits + {scales[pair]} N(0, 1); "
              f"sequence KL = {kl_:.5f}, JS = {js_:.5f}, cos(grad JS, grad KL) = {cos:.3f}")
    print("\n| estimator | placement | vs | " + " | ".join(f"{p}: error | size | cosine" for p in pairs) + " |")
    print("|---|---|---|" + "---:|" * 3 * len(pairs))
    for name in D.ESTIMATORS:
        for placement in PLACEMENTS:
            cells = []
            for _, _, _, target, rel, size, cos in (r for r in rows if r[1] == name and r[2] == placement):
                rel = 0.0 if rel < 1e-12 else rel                     # exact zeros, not rounding noise
                cells.append(f"{rel:.3f} | {size:.3f} | " + ("n/a" if cos is None else f"{cos:+.3f}"))
            print(f"| {name} | {placement} | grad {target} | " + " | ".join(cells) + " |")
    print("\nPull toward the reference per unit beta, in the reward (Eq. 3): the expected gradient's component along "
          "grad KL, in units of grad KL (what sets a penalty's strength at one beta; the cosine above sets only its "
          "direction)\n\n| estimator | " + " | ".join(scales) + " |\n|---|" + "---:|" * len(scales))
    for name, values in pull_table(scales, V, T).items():
        print(f"| {name} | " + " | ".join(f"{v:+.3f}" for v in values) + " |")


def main(argv=None):
    parser = config.Parser(description="Print the README's tables of the penalties (both by default).")
    parser.add_argument("--divergences", action="store_true", help="only what the penalties estimate")
    parser.add_argument("--gradients", action="store_true", help="only what they do to the gradient")
    args = parser.parse_args(argv)
    both = not (args.divergences or args.gradients)
    if args.divergences or both:
        print_divergence_table()
    if args.gradients or both:
        print("\n" if both else "", end="")
        print_gradient_table()


if __name__ == "__main__":
    sys.exit(exits.script(main))
