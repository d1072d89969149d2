"""
The paper's Table 1 and Figures 1-4 in miniature: every regularizer, several PPO seeds, on the built-in small world.

    python -m tools.sweep                                   # every configuration below x seeds 0-4 -> runs/sweep
    python -m tools.sweep --configs js kl none --seeds 0 1 --steps 20 --out runs/small -- --rollout-batch-size 32
    python -m tools.sweep --report-only --out runs/sweep    # re-read the finished runs, rewrite tables and plots

A configuration is a row of the paper's Table 1 (`clamped_kl`, `kl`, `bregman`, `squared`, `js`, `none`,
`dropout`), optionally with its own beta: `kl@0.1` is the KL penalty at beta = 0.1 (the others take --kl-coef,
the paper's 0.02). Each run is `python train.py --estimator E --kl-coef B --seed S --steps N --out
DIR/CONFIG/seedS [flags after --]`; --jobs of them at a time, each on its share of the CPU cores. All runs share
one small world (train.py --world-seed 0, built into .world/seed0 on first use): as in the paper's three runs per
row, one SFT policy and one reward model, and every ± below spans PPO's randomness only. A run whose
metrics.jsonl already reaches the last step under the same command is skipped and one with a checkpoint is
resumed, so an interrupted sweep continues where it stopped. Then it writes

    DIR/table1.md      per configuration, at the last step: the gold annotator's win rate against the reference
                       outputs (mean ± standard error over seeds), its difference to no regularization paired by
                       seed, true KL to the reference, response length; the paper's numbers beside
    DIR/beta.md        the KL penalty at every beta run (beta = 0 is no regularization)
    DIR/figure1_win_rate.png, figure2_kl_length.png, figure3_overoptimization.png, figure4_beta.png
The plots need matplotlib (optional: `pip install matplotlib`); without it only the tables are written.
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import train
from support import config, exits
from world.tasks import mean_se

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (the paper's Table 1 row, its win rate there in %, train.py flags); beta is added for the estimators
CONFIGS = {
    "clamped_kl": ("Clamped KL", "47.5 ± 0.2", ["--estimator", "clamped_kl"]),
    "kl": ("KL", "46.7 ± 0.02", ["--estimator", "kl"]),
    "bregman": ("Bregman", "49.0 ± 0.1", ["--estimator", "bregman"]),
    "squared": ("Squared error", "47.1 ± 0.1", ["--estimator", "squared"]),
    "js": ("Jensen-Shannon", "49.8 ± 0.3", ["--estimator", "js"]),
    "none": ("No regularization", "48.2 ± 0.1", ["--estimator", "none"]),
    "dropout": ("Dropout only (p = 0.5)", "48.4 ± 0.2", ["--estimator", "none", "--lora-dropout", "0.5"]),
}
PAPER_SFT = "37.0"  # the SFT-10k checkpoint's win rate in the paper's Table 1
DEFAULT = list(CONFIGS) + ["kl@0.1", "kl@0.5"] + [f"{n}@0.1" for n in ("clamped_kl", "bregman", "squared", "js")]
OWNED = ("--estimator", "--seed", "--steps", "--out", "--kl-coef", "--lr", "--resume")  # set by the sweep itself


def parse_config(spec, kl_coef):
    """'kl@0.1' -> ('kl', 0.1); 'js' -> ('js', kl_coef); 'none' and 'dropout' -> (name, 0.0)."""
    name, _, beta = spec.partition("@")
    if name not in CONFIGS:
        raise ValueError(f"configuration {spec!r}: {name!r} is not one of {', '.join(CONFIGS)}")
    if CONFIGS[name][2][1] == "none":
        if beta:
            raise ValueError(f"configuration {spec!r}: {name} has no penalty, so no beta")
        return name, 0.0
    try:
        value = float(beta) if beta else kl_coef
    except ValueError:
        raise ValueError(f"configuration {spec!r}: {beta!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise ValueError(f"configuration {spec!r}: beta must be a finite number >= 0")
    return name, value


def run_dir(out, spec, seed):
    return os.path.join(out, spec, f"seed{seed}")


def train_args(spec, seed, steps, kl_coef, lr, out, extra):
    name, beta = parse_config(spec, kl_coef)
    flags = CONFIGS[name][2] + ([] if CONFIGS[name][2][1] == "none" else ["--kl-coef", str(beta)])
    return flags + ["--seed", str(seed), "--steps", str(steps), "--lr", str(lr), "--out", run_dir(out, spec, seed)] \
        + list(extra)


def read_metrics(run):
    """{step: metrics line} of RUN/metrics.jsonl ({} if absent); a cut-off last line (a killed run) is dropped."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            lines, out = f.read().splitlines(), {}
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    for i, line in enumerate(lines):
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
        if not isinstance(m, dict) or not isinstance(m.get("step"), int):
            raise ValueError(f"{path}: line {i + 1} has no integer 'step'")
        if bad := [k for k, v in m.items() if k.startswith("eval_") and not isinstance(v, (int, float))]:
            raise ValueError(f"{path}: line {i + 1}: {bad[0]} is not a number")
        out[m["step"]] = m
    return out


def plan(run, args, steps):
    """What to do with one run: 'skip' (metrics reach `steps` under the same train.py arguments), 'resume'
    (same arguments and a checkpoint to continue from), or 'start' (nothing usable, or other arguments)."""
    try:
        recorded = json.load(open(os.path.join(run, "sweep.json")))["train_args"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded != args:
        return "start"
    if max(read_metrics(run), default=-1) == steps:
        return "skip"
    ckpt = os.path.join(run, "checkpoint")
    return "resume" if any(os.path.exists(os.path.join(c, "state.pt")) for c in (ckpt, ckpt + ".old")) else "start"


def start_train(args, run, threads):
    """train.py as a subprocess with `threads` CPU threads; its output goes to RUN/train.log."""
    os.makedirs(run, exist_ok=True)
    log = open(os.path.join(run, "train.log"), "a")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def last_line(run):
    try:
        with open(os.path.join(run, "train.log"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 400))
            lines = f.read().decode(errors="replace").splitlines()
        return lines[-1][:100] if lines else ""
    except OSError:
        return ""


def run_all(jobs, n_parallel, threads, every=60.0):
    """jobs: (label, run directory, train.py arguments) to start, n_parallel at a time; returns the failed labels."""
    queue, running, failed, last = list(jobs), [], [], time.time()
    try:
        wait_for(queue, running, failed, last, n_parallel, threads, every)
    except KeyboardInterrupt:  # Ctrl-C: each running train.py stops with its last finished step saved, as alone
        for _, _, p, _ in running:
            p.send_signal(signal.SIGINT)
        for _, _, p, _ in running:
            p.wait()
        raise
    return failed


def wait_for(queue, running, failed, last, n_parallel, threads, every):
    """run_all's loop: start jobs as places free up, report each as it ends, and the running ones every minute."""
    while queue or running:
        while queue and len(running) < n_parallel:
            label, run, args = queue.pop(0)
            running.append((label, run, start_train(args, run, threads), time.time()))
        time.sleep(0.5)
        for job in [j for j in running if j[2].poll() is not None]:
            label, run, p, t0 = job
            running.remove(job)
            m = read_metrics(run)
            win = [v["eval_win_rate"] for _, v in sorted(m.items()) if "eval_win_rate" in v]
            print(f"{label}: " + (f"done in {time.time() - t0:.0f} s" + (f", win rate {100 * win[-1]:.1f}%" if win
                                                                        else "") if p.returncode == 0 else
                                  f"FAILED (exit code {p.returncode}), see {os.path.join(run, 'train.log')}"),
                  flush=True)
            if p.returncode != 0:
                failed.append(label)
        if running and time.time() - last >= every:
            last = time.time()
            for label, run, _, t0 in running:
                print(f"{label}: {time.time() - t0:.0f} s | {last_line(run)}", flush=True)


def throughput(runs, seconds):
    """The world's speed, to compare one change with the next: PPO steps per second and 60-step runs per hour over
    the sweep's wall time, and where the runs spent their time (from each step's time_* fields in metrics.jsonl)."""
    phases = dict(generate="time_generate", score="time_score", update="time_train", evaluate="time_eval")
    total = dict.fromkeys(phases, 0.0)
    steps = 0
    for run in runs:
        for step, m in read_metrics(run).items():
            steps += step > 0
            for name, key in phases.items():
                total[name] += m.get(key, 0.0)
    busy = sum(total.values()) or float("nan")
    return (f"throughput: {steps / seconds:.2f} PPO steps/s, {3600 * steps / seconds / 60:.0f} 60-step runs/hour; "
            "time in runs: " + ", ".join(f"{name} {100 * t / busy:.0f}%" for name, t in total.items()))


# -----------------------------------------------------------------------------
# report

def collect(out, specs):
    """{spec: {seed: {step: metrics}}} of the runs under OUT that logged an evaluation after step 0."""
    runs = {}
    for spec in specs:
        d = os.path.join(out, spec)
        seeds = sorted(int(s[4:]) for s in (os.listdir(d) if os.path.isdir(d) else []) if re.fullmatch(r"seed\d+", s))
        ms = {s: read_metrics(run_dir(out, spec, s)) for s in seeds}
        ms = {s: m for s, m in ms.items() if any(k > 0 and "eval_score" in v for k, v in m.items())}
        if ms:
            runs[spec] = ms
    return runs


def final(m):
    """The last evaluation of one run."""
    return m[max(k for k, v in m.items() if "eval_score" in v)]


def stat(per_seed, key, scale=1.0):
    xs = [scale * v[key] for v in per_seed.values() if key in v]
    return mean_se(xs) if xs and len(xs) == len(per_seed) else (None, float("nan"))


def paired(a, b, key="eval_win_rate", scale=100.0):
    """Mean ± standard error over the seeds both rows ran of the per-seed difference a - b (same seed, same
    world, same prompt order: pairing removes what the seeds share)."""
    seeds = sorted(set(a) & set(b))
    d = [scale * (a[s][key] - b[s][key]) for s in seeds if key in a[s] and key in b[s]]
    return mean_se(d) if d else (None, float("nan"))


def fmt(mean_and_se, digits=1, sign=False):
    mean, se = mean_and_se
    if mean is None:
        return "n/a"
    return f"{mean:{'+' if sign else ''}.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def columns(runs, kl_coef):
    """{(name, beta): spec} of the runs, and Table 1's betas: those at which two or more estimators ran."""
    keys = {parse_config(spec, kl_coef): spec for spec in runs}
    count = {}
    for name, beta in keys:
        count[beta] = count.get(beta, 0) + (beta > 0)
    return keys, sorted(b for b, c in count.items() if c >= 2) or sorted(b for b in count if b > 0) or [kl_coef]


def report(out, specs, kl_coef):
    """Write OUT/table1.md and OUT/beta.md (and the plots when matplotlib is there); return the table rows."""
    runs = collect(out, specs)
    if not runs:
        raise ValueError(f"{out}: no run of {', '.join(specs)} has logged an evaluation after step 0 yet")
    finals = {spec: {s: final(m) for s, m in ms.items()} for spec, ms in runs.items()}
    sft = {s: m[0] for ms in runs.values() for s, m in ms.items() if 0 in m and "eval_score" in m[0]}
    keys, betas = columns(runs, kl_coef)
    none = finals.get(keys.get(("none", 0.0)), {})
    rows = []
    for name, (label, paper, flags) in CONFIGS.items():
        cells = []
        for beta in betas:
            f = finals.get(keys.get((name, 0.0 if flags[1] == "none" else beta)))
            cells.append(None if f is None else {
                "beta": beta, "seeds": sorted(f), "win": stat(f, "eval_win_rate", 100),
                "vs_none": paired(f, none) if name != "none" else (None, math.nan),
                "kl": stat(f, "eval_true_kl"), "length": stat(f, "eval_length"), "score": stat(f, "eval_score")})
        if any(cells):
            rows.append({"name": name, "label": label, "paper": paper, "cells": cells})

    head = ["configuration", "paper (%)"]
    for beta in betas:
        head += [f"β = {beta:g}: win rate (%)", "vs none (points)", "true KL", "length"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if sft:
        s = [(stat(sft, k, scale)[0], math.nan) for k, scale in (("eval_win_rate", 100), ("eval_true_kl", 1),
                                                                 ("eval_length", 1))]  # the same in every seed
        lines.append(f"| SFT policy (step 0) | {PAPER_SFT} |" + f" {fmt(s[0])} | | {fmt(s[1], 2)} | {fmt(s[2])} |"
                     * len(betas))
    for r in rows:
        line = [r["label"], r["paper"]]
        for c in r["cells"]:
            line += ["n/a"] * 4 if c is None else [fmt(c["win"]), fmt(c["vs_none"], sign=True), fmt(c["kl"], 2),
                                                   fmt(c["length"])]
        lines.append("| " + " | ".join(line) + " |")
    seeds = sorted({s for f in finals.values() for s in f})
    steps = sorted({v["step"] for f in finals.values() for v in f.values()})
    lines += ["", f"Step {'-'.join(map(str, steps))}, seeds {' '.join(map(str, seeds))}. Each cell: mean ± standard "
              "error over its seeds (sample standard deviation, n - 1, / sqrt(n); the paper bootstraps over three "
              "runs). Win rate: greedy responses to the held-out prompts against the reference outputs, judged by "
              "the gold annotator, ties 1/2. vs none: the per-seed difference to no regularization (same seed), "
              "mean ± its standard error. True KL: the exact KL(policy || reference) summed over a response's "
              "tokens, nats; length: response tokens including EOS; both on the evaluation prompts, greedy. "
              "No regularization and dropout have no beta: they repeat in every column."]
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 3]))
    beta_rows = beta_table(out, runs, finals, kl_coef)
    plot(out, runs, kl_coef)
    return rows, beta_rows


def beta_table(out, runs, finals, kl_coef):
    """The KL penalty at every beta that ran, with no regularization as beta = 0."""
    specs = kl_sweep(runs, kl_coef)
    if len(specs) < 2:
        return []
    lines = ["| β | seeds | win rate (%) | vs none (points) | best win rate (%) at step | true KL | length | "
             "reward score |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for spec in specs:
        f, beta = finals[spec], parse_config(spec, kl_coef)[1]
        steps, mean, _ = curve(runs[spec], "eval_win_rate", 100)
        best = max(range(len(steps)), key=lambda i: mean[i])
        rows.append({"beta": beta, "win": stat(f, "eval_win_rate", 100), "best": (mean[best], steps[best]),
                     "vs_none": paired(f, finals[specs[0]]) if beta > 0 and specs[0] == "none" else (None, math.nan)})
        lines.append(f"| {beta:g} | {len(f)} | {fmt(rows[-1]['win'])} | {fmt(rows[-1]['vs_none'], sign=True)} | "
                     f"{mean[best]:.1f} at {steps[best]} | {fmt(stat(f, 'eval_true_kl'), 2)} | "
                     f"{fmt(stat(f, 'eval_length'))} | {fmt(stat(f, 'eval_score'), 3)} |")
    lines += ["", "At the last step unless said otherwise; best win rate: the highest point of the mean curve over "
              "the evaluated steps (choosing it on the evaluation prompts flatters it). Columns as in table1.md."]
    with open(os.path.join(out, "beta.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(specs) + 2]))
    return rows


def kl_sweep(runs, kl_coef):
    """The runs of the KL penalty and of no regularization (beta = 0), by beta."""
    return sorted((s for s in runs if parse_config(s, kl_coef)[0] in ("kl", "none")),
                  key=lambda s: parse_config(s, kl_coef)[1])


def curve(ms, key, scale=1.0, transform=None):
    """Steps that every seed logged `key` at, and the mean and standard error over seeds there."""
    steps = sorted(set.intersection(*[{k for k, v in m.items() if key in v} for m in ms.values()]))
    t = transform or (lambda x: x)
    stats = [mean_se([scale * t(m[k][key]) for m in ms.values()]) for k in steps]
    return steps, [s[0] for s in stats], [0.0 if math.isnan(s[1]) else s[1] for s in stats]


def plot(out, runs, kl_coef):
    """Figures 1-4 as PNG files in OUT (figure 4 in plot_beta); three lists of matplotlib calls in a row."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    keys, betas = columns(runs, kl_coef)
    colors = dict(zip(CONFIGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    n = sorted({len(ms) for ms in runs.values()})
    seeds = f"mean ± SE over {'-'.join(map(str, n[::max(1, len(n) - 1)]))} seeds"

    def column(beta):  # {spec: runs} of the Table-1 rows at one beta, with no regularization and dropout
        specs = [keys.get((name, 0.0 if flags[1] == "none" else beta)) for name, (_, _, flags) in CONFIGS.items()]
        return {spec: runs[spec] for spec in specs if spec is not None}

    def draw(ax, ms, spec, key, scale=1.0):
        name = parse_config(spec, kl_coef)[0]
        steps, mean, se = curve(ms, key, scale)
        ls = "--" if CONFIGS[name][2][1] == "none" else "-"
        ax.plot(steps, mean, ls=ls, color=colors[name], label=CONFIGS[name][0])
        ax.fill_between(steps, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                        color=colors[name], alpha=0.15)

    files = []
    fig, axes = plt.subplots(1, len(betas), figsize=(6 * len(betas), 4), squeeze=False)
    for ax, beta in zip(axes[0], betas):
        for spec, ms in column(beta).items():
            draw(ax, ms, spec, "eval_win_rate", 100)
        ax.set(xlabel="PPO step", ylabel="gold win rate against the reference (%)", title=f"β = {beta:g} ({seeds})")
    axes[0][0].legend(fontsize=8)
    files.append(save(fig, out, "figure1_win_rate.png"))

    fig, axes = plt.subplots(len(betas), 2, figsize=(11, 3.6 * len(betas)), squeeze=False)
    for (left, right), beta in zip(axes, betas):
        for spec, ms in column(beta).items():
            draw(left, ms, spec, "eval_true_kl")  # on the evaluation prompts: the same prompts at every step
            draw(right, ms, spec, "eval_length")
        left.set(xlabel="PPO step", ylabel="true KL to the reference (nats/response)",
                 title=f"β = {beta:g}: true KL ({seeds})")
        right.set(xlabel="PPO step", ylabel="response length (tokens, EOS included)", title=f"β = {beta:g}: length")
    axes[0][0].legend(fontsize=8)
    files.append(save(fig, out, "figure2_kl_length.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for spec, ms in column(betas[0]).items():
        name = parse_config(spec, kl_coef)[0]
        _, win, _ = curve(ms, "eval_win_rate", 100)
        _, score, _ = curve(ms, "eval_score")
        _, root_kl, _ = curve(ms, "eval_true_kl", transform=lambda x: math.sqrt(max(x, 0.0)))
        for ax, x in ((left, score), (right, root_kl)):
            ax.plot(x, win, marker="o", ms=3, color=colors[name], label=CONFIGS[name][0],
                    ls="--" if CONFIGS[name][2][1] == "none" else "-")
    left.set(xlabel="reward-model (proxy) score", ylabel="gold win rate (%)",
             title=f"Gold vs proxy, β = {betas[0]:g} (mean over seeds)")
    right.set(xlabel="sqrt(true KL to the reference)", ylabel="gold win rate (%)", title="Gold vs sqrt(KL)")
    left.legend(fontsize=8)
    files.append(save(fig, out, "figure3_overoptimization.png"))

    if len(kl_sweep(runs, kl_coef)) >= 2:
        files.append(plot_beta(plt, out, runs, kl_coef, seeds))
    plt.close("all")
    print("wrote " + ", ".join(files))
    return files


def plot_beta(plt, out, runs, kl_coef, seeds):
    """Figure 4: the KL penalty at every beta run, win rate over steps and against the true KL."""
    kl_specs = kl_sweep(runs, kl_coef)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, spec in enumerate(kl_specs):
        ms, beta = runs[spec], parse_config(spec, kl_coef)[1]
        steps, mean, se = curve(ms, "eval_win_rate", 100)
        color = plt.cm.viridis(i / max(1, len(kl_specs) - 1))
        left.plot(steps, mean, color=color, label=f"β = {beta:g}")
        left.fill_between(steps, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                          color=color, alpha=0.15)
        _, kl, _ = curve(ms, "eval_true_kl")
        right.plot(kl, mean, marker="o", ms=3, color=color, label=f"β = {beta:g}")
    left.set(xlabel="PPO step", ylabel="gold win rate (%)", title=f"KL penalty at each β ({seeds})")
    right.set(xlabel="true KL to the reference (nats/response)", ylabel="gold win rate (%)",
              title="Gold win rate against KL, along each run")
    left.legend(fontsize=8)
    return save(fig, out, "figure4_beta.png")


def save(fig, out, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    return os.path.join(out, name)


def check_train_args(targs):
    """train.py's flag checks on one run's arguments: one ValueError naming the flag (argparse's own complaint, e.g.
    an unknown flag after --, is caught rather than printed with its usage)."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            config.parse(train.Args, train.WORLD, targs)
        except SystemExit:
            raise ValueError(err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]) from None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:cut], argv[cut + 1:]  # flags after -- go to every train.py run
    p = config.Parser(description="Sweep the regularizers over seeds; write Table 1 and Figures 1-4.")
    p.add_argument("--configs", nargs="+", default=DEFAULT, metavar="NAME[@BETA]",
                   help=f"of: {' '.join(CONFIGS)}, each optionally @beta (default: {' '.join(DEFAULT)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=60, help="PPO steps per run")
    p.add_argument("--kl-coef", type=float, default=0.02, help="beta of the estimators without @beta (Eq. 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="PPO's learning rate in every run: twice the world "
                   "preset's, so that over-optimization peaks and falls within 60 steps")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: the cores / --jobs)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--report-only", action="store_true", help="only re-read the runs and rewrite tables and plots")
    args = p.parse_args(argv)
    for spec in args.configs:
        parse_config(spec, args.kl_coef)
    owned = [f for f in extra if f.split("=")[0] in OWNED]
    if owned:
        raise ValueError(f"{' '.join(owned)} after --: the sweep sets {', '.join(OWNED)} itself (use its own options)")
    for flag, value in (("--jobs", args.jobs), ("--threads", args.threads or 1), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a directory of runs")
    for spec, seed in [(spec, s) for s in args.seeds for spec in args.configs]:  # train.py's own checks, before any run
        check_train_args(train_args(spec, seed, args.steps, args.kl_coef, args.lr, args.out, extra))
    failed = []
    if not args.report_only:
        todo, specs = [], [(spec, s) for s in args.seeds for spec in args.configs]  # seed-major: early rows all
        for i, (spec, seed) in enumerate(specs, 1):
            run = run_dir(args.out, spec, seed)
            targs = train_args(spec, seed, args.steps, args.kl_coef, args.lr, args.out, extra)
            action = plan(run, targs, args.steps)
            print(f"[{i}/{len(specs)}] {spec} seed {seed}: {action} ({run})", flush=True)
            if action != "skip":
                os.makedirs(run, exist_ok=True)
                with open(os.path.join(run, "sweep.json"), "w") as f:
                    json.dump({"train_args": targs}, f)
                todo.append((f"[{i}/{len(specs)}] {spec} seed {seed}", run,
                             targs + (["--resume"] if action == "resume" else [])))
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        t0 = time.time()
        failed = run_all(todo, args.jobs, threads)
        print(f"{len(todo)} runs in {time.time() - t0:.0f} s ({args.jobs} at a time, {threads} thread(s) each)"
              + (f"; {len(failed)} failed: {', '.join(failed)}; the tables leave them out" if failed else ""), flush=True)
        if todo:
            print(throughput([run for _, run, _ in todo], time.time() - t0), flush=True)
    report(args.out, args.configs, args.kl_coef)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(exits.script(main, "interrupted (SIGINT): the runs stopped with their last finished step saved; the same "
                                "command resumes them"))
