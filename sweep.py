"""
The paper's Table 1 and Figure 2 in miniature: every regularizer, a few seeds, on the built-in small world.

    python sweep.py                                    # 7 configurations x seeds 0 1 2 x 30 steps -> runs/sweep
    python sweep.py --configs js kl none --seeds 0 1 --steps 20 --out runs/small -- --rollout-batch-size 32
    python sweep.py --report-only --out runs/sweep     # re-read the finished runs, rewrite table and plots

Each run is `python train.py --estimator E --seed S --steps N --out DIR/CONFIG/seedS [flags after --]`, one
after another. All runs share one small world (train.py --world-seed, default 0, built into .world/seed0 on
first use, which takes minutes): as in the paper's three runs per row, one SFT policy and one reward model,
and the ± below spans PPO's randomness only.
A run whose metrics.jsonl already reaches the last step under the same command is skipped and one with a
checkpoint is resumed, so an interrupted sweep continues where it stopped. Then it writes
    DIR/table1.md             per configuration (the paper's Table 1 rows): final win rate against the reference
                              outputs, mean ± standard error over seeds and per seed; task accuracy, reward
                              score, true KL to the reference, response length; the SFT policy (step 0) first
    DIR/figure1_win_rate.png  win rate vs PPO step, mean over seeds (the paper's Figure 1)
    DIR/figure2_true_kl.png   true KL to the reference (left) and response length (right) vs step (Figure 2)
The plots need matplotlib (optional: `pip install matplotlib`); without it only the table is written.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))

# name -> (the paper's Table 1 row, train.py flags); the five estimators also get --kl-coef (beta in Eq. 3)
CONFIGS = {
    "clamped_kl": ("Clamped KL", ["--estimator", "clamped_kl"]),
    "kl": ("KL", ["--estimator", "kl"]),
    "bregman": ("Bregman", ["--estimator", "bregman"]),
    "squared": ("Squared error", ["--estimator", "squared"]),
    "js": ("Jensen-Shannon", ["--estimator", "js"]),
    "none": ("No regularization", ["--estimator", "none"]),
    "dropout": ("Dropout only (p = 0.5)", ["--estimator", "none", "--lora-dropout", "0.5"]),
}
OWNED = ("--estimator", "--seed", "--steps", "--out", "--kl-coef", "--resume")  # set by the sweep itself
# final-eval columns of table1.md: (metrics key, header, scale)
COLUMNS = [("eval_accuracy", "accuracy (%)", 100), ("eval_score", "reward score", 1),
           ("eval_true_kl", "true KL (nats/seq)", 1), ("eval_length", "length (tokens)", 1)]


def run_dir(out, name, seed):
    return os.path.join(out, name, f"seed{seed}")


def train_args(name, seed, steps, kl_coef, out, extra):
    flags = CONFIGS[name][1] + ([] if CONFIGS[name][1][1] == "none" else ["--kl-coef", str(kl_coef)])
    return flags + ["--seed", str(seed), "--steps", str(steps), "--out", run_dir(out, name, seed)] + list(extra)


def read_metrics(run):
    """{step: metrics line} of RUN/metrics.jsonl ({} if absent); a cut-off last line (a killed run) is dropped."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    lines, out = open(path).read().splitlines(), {}
    for i, line in enumerate(lines):
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
        if not isinstance(m, dict) or not isinstance(m.get("step"), int):
            raise ValueError(f"{path}: line {i + 1} has no integer 'step'")
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


def run_train(args, run, prefix):
    """train.py as a subprocess; its output goes to the console (prefixed) and to RUN/train.log."""
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "train.log"), "a") as log:
        p = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            log.write(line)
            print(prefix + line, end="", flush=True)
        return p.wait()


def mean_se(xs):
    """Mean and standard error over seeds: sample standard deviation (n - 1 denominator) / sqrt(n)."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")


def collect(out, configs):
    """{config: {seed: {step: metrics}}} of the runs under OUT that logged an evaluation after step 0."""
    runs = {}
    for name in configs:
        d = os.path.join(out, name)
        seeds = sorted(int(s[4:]) for s in (os.listdir(d) if os.path.isdir(d) else []) if re.fullmatch(r"seed\d+", s))
        ms = {s: read_metrics(run_dir(out, name, s)) for s in seeds}
        ms = {s: m for s, m in ms.items() if any(k > 0 and "eval_score" in v for k, v in m.items())}
        if ms:
            runs[name] = ms
    return runs


def fmt(mean, se, scale=1, digits=3):
    if mean is None:
        return "n/a"
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {scale * se:.{digits}f}")


def report(out, configs):
    """Write OUT/table1.md (and the plots when matplotlib is there); return the table rows as numbers."""
    runs = collect(out, configs)
    if not runs:
        raise ValueError(f"{out}: no run of {', '.join(configs)} has logged an evaluation after step 0 yet")
    sft = {}  # seed -> step-0 evaluation: the SFT policy (LoRA B = 0), the same greedy outputs in every config
    for ms in runs.values():
        for s, m in ms.items():
            if 0 in m and "eval_score" in m[0]:
                sft.setdefault(s, m[0])
    finals = {name: {s: m[max(k for k, v in m.items() if "eval_score" in v)] for s, m in ms.items()}
              for name, ms in runs.items()}
    rows = []
    for label, per_seed in ([("SFT policy (step 0)", sft)] if sft else []) + \
            [(CONFIGS[n][0], f) for n, f in finals.items()]:
        seeds = sorted(per_seed)
        row = {"label": label, "seeds": seeds, "steps": sorted({per_seed[s]["step"] for s in seeds})}
        for key in ["eval_win_rate"] + [c[0] for c in COLUMNS]:
            xs = [per_seed[s][key] for s in seeds if key in per_seed[s]]
            row[key] = mean_se(xs) if len(xs) == len(seeds) else (None, float("nan"))
        row["per_seed"] = [per_seed[s].get("eval_win_rate") for s in seeds]
        rows.append(row)

    head = ["configuration", "seeds", "step", "win rate (%)", "per seed (%)"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per = ", ".join("n/a" if x is None else f"{100 * x:.1f}" for x in r["per_seed"])
        lines.append("| " + " | ".join([r["label"], " ".join(map(str, r["seeds"])), "-".join(map(str, r["steps"])),
                                        fmt(*r["eval_win_rate"], 100, 1), per]
                                       + [fmt(*r[k], scale, 1 if scale == 100 else 3) for k, _, scale in COLUMNS]) + " |")
    within = [m["eval_win_rate_se"] for f in finals.values() for m in f.values() if "eval_win_rate_se" in m]
    lines += ["", "± is the standard error over seeds: the sample standard deviation of the per-seed values (n - 1 "
              "denominator) divided by sqrt(n), n = the number of seeds (the paper bootstraps over its three runs)."
              + (f" One run's own standard error over the evaluation prompts is {100 * sum(within) / len(within):.1f} "
                 f"points of win rate on average." if within else ""),
              "Win rate: greedy responses to the held-out prompts against the reference outputs, judged by the "
              "simulated annotator, ties count 1/2. True KL: the exact KL(policy || reference) summed over each "
              "response's tokens, mean over prompts. Length: response tokens including EOS. All at the final step."]
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 2]))
    print(f"wrote {os.path.join(out, 'table1.md')}")
    plot(out, runs)
    return rows


def curve(ms, key, scale=1):
    """Mean over seeds of `key` at every step that all seeds logged it."""
    steps = sorted(set.intersection(*[{k for k, v in m.items() if key in v} for m in ms.values()]))
    return steps, [scale * sum(m[k][key] for m in ms.values()) / len(ms) for k in steps]


def plot(out, runs):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    style = lambda name: dict(label=CONFIGS[name][0], ls="--" if CONFIGS[name][1][1] == "none" else "-")
    n = sorted({len(ms) for ms in runs.values()})
    seeds = lambda: f"mean over {'-'.join(map(str, n[::max(1, len(n) - 1)]))} seed{'s' if n[-1] > 1 else ''}"
    files = []
    if any(curve(ms, "eval_win_rate")[0] for ms in runs.values()):  # real checkpoints have no annotator
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, ms in runs.items():
            ax.plot(*curve(ms, "eval_win_rate", 100), marker="o", **style(name))
        ax.set(xlabel="PPO step", ylabel="win rate against the reference (%)", title=f"Win rate ({seeds()})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(os.path.join(out, "figure1_win_rate.png"))
        fig.savefig(files[-1], dpi=120)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, ms in runs.items():
        left.plot(*curve(ms, "true_kl"), **style(name))
        right.plot(*curve(ms, "response_length"), **style(name))
    left.set(xlabel="PPO step", ylabel="true KL to the reference (nats per response)", title=f"True KL on rollouts ({seeds()})")
    right.set(xlabel="PPO step", ylabel="response length (tokens)", title=f"Response length ({seeds()})")
    left.legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "figure2_true_kl.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close("all")
    print("wrote " + ", ".join(files))
    return files


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:cut], argv[cut + 1:]  # flags after -- go to every train.py run
    p = argparse.ArgumentParser(description="Sweep the regularizers over seeds; write Table 1 and Figure 2.")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                   help=f"subset of: {' '.join(CONFIGS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30, help="PPO steps per run")
    p.add_argument("--kl-coef", type=float, default=0.02, help="beta of the five estimators (Eq. 3)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--report-only", action="store_true", help="only re-read the runs and rewrite table + plots")
    args = p.parse_args(argv)
    owned = [f for f in extra if f.split("=")[0] in OWNED]
    if owned:
        raise ValueError(f"{' '.join(owned)} after --: the sweep sets {', '.join(OWNED)} itself (use its own options)")
    failed = []
    if not args.report_only:
        jobs = [(name, s) for s in args.seeds for name in args.configs]  # seed-major: a partial sweep covers every row
        for i, (name, seed) in enumerate(jobs, 1):
            run = run_dir(args.out, name, seed)
            targs = train_args(name, seed, args.steps, args.kl_coef, args.out, extra)
            action = plan(run, targs, args.steps)
            print(f"[{i}/{len(jobs)}] {name} seed {seed}: {action} ({run})", flush=True)
            if action == "skip":
                continue
            os.makedirs(run, exist_ok=True)
            with open(os.path.join(run, "sweep.json"), "w") as f:
                json.dump({"train_args": targs}, f)
            t0 = time.time()
            rc = run_train(targs + (["--resume"] if action == "resume" else []), run, f"[{name} s{seed}] ")
            print(f"[{i}/{len(jobs)}] {name} seed {seed}: " + (f"done in {time.time() - t0:.0f} s" if rc == 0 else
                  f"FAILED (exit code {rc}), see {os.path.join(run, 'train.log')}"), flush=True)
            if rc != 0:
                failed.append(f"{name} seed {seed}")
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; the table leaves them out", flush=True)
    report(args.out, args.configs)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
