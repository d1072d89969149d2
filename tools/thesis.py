"""
The paper's thesis in the small world: what LoRA itself does to RLHF's regularization. Full fine-tuning beside LoRA,
with and without the KL penalty, on several worlds (each its own SFT policy and reward model) and PPO seeds.

    python -m tools.thesis lr          # the learning-rate grid: each arm without penalty, world 0, seed 0
    python -m tools.thesis main        # full and LoRA, each at its lr x {no penalty, KL beta 0.1} x worlds x seeds
    python -m tools.thesis ranks       # LoRA at rank 1, rank 64 and on all projections, no penalty, worlds x seeds
    python -m tools.thesis js          # LoRA with the paper's JS beside the KL, each at two betas, worlds x seeds
    python -m tools.thesis report      # re-read the runs: docs/thesis/runs.csv, docs/thesis/tables.md, the figures

An arm is how PPO trains the policy and the value model: `full` (every weight, `--finetune full`) or `lora` (rank 8
on the attention projections, the paper's). Each run is the sweep's: `python train.py --estimator E --kl-coef B
--seed S --steps 60 --lr LR --out runs/thesis/world{W}/{arm}/lr{LR}/{config}/seed{S} --world-seed W --eval-every 10
[arm flags]`, two at a time on one thread each, skipped when finished and resumed when interrupted (the same command
continues). `report` needs only docs/thesis/runs.csv when the runs are gone, so every number and figure in the
tables can be recomputed from the committed CSV: `python -m tools.thesis report --from-csv`.
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130

import csv
import json
import math
import os
import subprocess
import sys
import time

from support import config, exits
from tools import sweep
from world.tasks import mean_se

# name -> train.py flags: full fine-tuning, the paper's LoRA (rank 8 on wq, wk, wv, wo), and LoRA's trainable
# fraction varied: rank 1 and rank 64 (a full-rank update of every attention projection at dim 64), and rank 8 on
# all seven projections ("LoRA Without Regret")
ARMS = {"full": ["--finetune", "full"], "lora": [], "lora-r1": ["--lora-rank", "1"],
        "lora-r64": ["--lora-rank", "64"], "lora-all": ["--lora-targets", "all"]}
# each arm's learning rates tried by `lr`, each choice with a tried rate on either side
GRID = {"full": [3e-5, 1e-4, 3e-4, 1e-3], "lora": [1e-4, 3e-4, 1e-3, 3e-3], "lora-r1": [1e-4, 3e-4, 1e-3],
        "lora-r64": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "lora-all": [1e-4, 3e-4, 1e-3, 3e-3]}
LR = {"full": 1e-4, "lora": 3e-4, "lora-r1": 3e-4, "lora-r64": 3e-4, "lora-all": 3e-4}  # what `lr` chose: each
# arm's highest peak gold win rate (tables.md, first table)
CONFIGS = ["none", "kl@0.1"]  # no penalty, and the KL penalty at the beta that leads the world's Table 1
# the paper's JS beside the KL at matched KL (LoRA): with `main`'s none and kl@0.1, each penalty at beta 0 and two
# betas spanning the same KL range (JS pulls 20-110x less per unit beta, so its betas are 25x the KL's)
JS = ["kl@0.02", "js@0.5", "js@2.5"]
BUDGETS, BUDGET = [0.5, 1.0, 2.0], 1.0  # nats of sampled KL: the frontier's budgets, and the one the claims use
MAIN, RANKS = ["full", "lora"], ["lora-r1", "lora-r64", "lora-all"]  # `main` runs both configs, `ranks` only none
WORLDS, SEEDS, STEPS, EVAL_EVERY = [0, 1, 2], [0, 1, 2], 60, 10
FIELDS = ["world", "arm", "lr", "config", "seed", "step", "win_rate", "greedy_kl", "sampled_kl", "score", "length",
          "accuracy"]


def experiment(name):
    """(world, arm, lr, config, seed) of the runs of `lr`, `main`, `ranks` or `js`, seed-major: a cut-off run still
    spans the worlds."""
    if name == "lr":
        return [(0, arm, lr, "none", 0) for arm in ARMS for lr in GRID[arm]]
    arms, configs = {"main": (MAIN, CONFIGS), "ranks": (RANKS, CONFIGS[:1]), "js": (["lora"], JS)}[name]
    return [(w, arm, LR[arm], c, s) for s in SEEDS for w in WORLDS for arm in arms for c in configs]


def run_args(out, world, arm, lr, spec, seed):
    """The run's directory and its train.py arguments (the sweep's, with the world and the arm after them)."""
    base = os.path.join(out, f"world{world}", arm, f"lr{lr:g}")
    extra = ["--world-seed", str(world), "--eval-every", str(EVAL_EVERY)] + ARMS[arm]
    return sweep.run_dir(base, spec, seed), sweep.train_args(spec, seed, STEPS, 0.02, lr, base, extra)


def build_worlds(worlds):
    """Each world the runs need, built first as `python -m world.build` builds it (its runs would otherwise race to
    build it, one thread each)."""
    for w in worlds:
        d = os.path.join(sweep.ROOT, ".world", f"seed{w}")
        if not os.path.exists(os.path.join(d, "world.json")):
            print(f"building world {w} into {d} (4-5 minutes)", flush=True)
            code = subprocess.run([sys.executable, "-m", "world.build", "--out", d, "--seed", str(w)],
                                  cwd=sweep.ROOT).returncode
            if code:
                raise ValueError(f"python -m world.build --out {d} --seed {w} failed (exit code {code}), see above")


def run(out, runs):
    """Build the worlds, then start, resume or skip each run as the sweep does; the failed labels."""
    build_worlds(sorted({key[0] for key in runs}))
    todo = []
    for i, key in enumerate(runs, 1):
        d, targs = run_args(out, *key)
        sweep.check_train_args(targs)
        action = sweep.plan(d, targs, STEPS)
        label = f"[{i}/{len(runs)}] world {key[0]} {key[1]} lr {key[2]:g} {key[3]} seed {key[4]}"
        print(f"{label}: {action}", flush=True)
        if action != "skip":
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "sweep.json"), "w") as f:
                json.dump({"train_args": targs}, f)
            todo.append((label, d, targs + (["--resume"] if action == "resume" else [])))
    t0 = time.time()
    failed = sweep.run_all(todo, 2, max(1, (os.cpu_count() or 1) // 2))
    print(f"{len(todo)} runs in {time.time() - t0:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if todo:
        print(sweep.throughput([d for _, d, _ in todo], time.time() - t0), flush=True)
    return failed


def rows_of(out, runs):
    """One CSV row per evaluation of every finished or running run. sampled_kl: the exact KL(policy || reference)
    summed over a response's tokens, averaged over the rollouts (the policy's own samples at temperature 1 on 64
    training prompts) of the 5 steps up to the evaluation; greedy_kl the same on the greedy responses to the 500
    evaluation prompts."""
    rows = []
    for key in runs:
        m = sweep.read_metrics(run_args(out, *key)[0])
        for step in sorted(k for k, v in m.items() if "eval_win_rate" in v):
            rollouts = [m[k]["true_kl"] for k in range(step - 4, step + 1) if k in m and "true_kl" in m[k]]
            e = m[step]
            values = [100 * e["eval_win_rate"], e["eval_true_kl"], sum(rollouts) / len(rollouts) if rollouts else 0.0,
                      e["eval_score"], e["eval_length"], 100 * e["eval_accuracy"]]
            rows.append(dict(zip(FIELDS, [*key[:4], key[4], step] + [stored(v) for v in values])))
    return rows


def stored(v):
    """A value as runs.csv stores it (6 significant digits), so that the tables from the runs and from the CSV are
    the same to the last digit."""
    return float(f"{v:.6g}")


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


def read_csv(path):
    """The rows write_csv wrote; anything else is refused naming the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (`python -m tools.thesis report` writes it from the runs)")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            raise ValueError(f"{path}: the header is not {','.join(FIELDS)}")
        for i, r in enumerate(reader, 2):
            try:
                rows.append({k: v if k in ("arm", "config") else int(v) if k in ("world", "seed", "step") else
                             float(v) for k, v in r.items()})
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {i} is not a row of {len(FIELDS)} numbers and names") from None
    return rows


# -----------------------------------------------------------------------------
# statistics over worlds and seeds

def nested(values):
    """values: {(world, seed): x}. Mean and standard error over the worlds' means (each the mean of its seeds): the
    SE covers both what the world draw and what PPO's seed change, as for a mean over independent worlds."""
    worlds = sorted({w for w, _ in values})
    means = [sum(x for (w, _), x in values.items() if w == wo) / sum(1 for w, _ in values if w == wo)
             for wo in worlds]
    return mean_se(means) if means else (None, math.nan)


def per_world(values):
    """{world: mean over its seeds}"""
    return {w: sum(x for (v, _), x in values.items() if v == w) / sum(1 for v, _ in values if v == w)
            for w in sorted({w for w, _ in values})}


def at(rows, arm, config, field, step=None):
    """{(world, seed): the field at `step` (default: the last evaluated step)} of one arm and configuration."""
    mine = [r for r in rows if r["arm"] == arm and r["config"] == config and r["lr"] == LR[arm]]
    last = step if step is not None else max((r["step"] for r in mine), default=None)
    return {(r["world"], r["seed"]): r[field] for r in mine if r["step"] == last}


def best_step(rows, arm, config):
    """The step at which the mean win-rate curve over all worlds and seeds peaks (chosen on the evaluation
    prompts, so it flatters the peak)."""
    steps = sorted({r["step"] for r in rows if r["arm"] == arm and r["config"] == config and r["lr"] == LR[arm]})
    return max(steps, key=lambda s: nested(at(rows, arm, config, "win_rate", s))[0])


def within(rows, arm, config, budget):
    """{(world, seed): the run's best gold win rate among its evaluations whose sampled KL is at most `budget` nats}:
    the win rate a KL budget buys (Gao et al. 2022's frontier; step 0, at KL 0, always counts; chosen on the
    evaluation prompts, so it flatters every arm alike)."""
    out = {}
    for r in rows:
        if r["arm"] == arm and r["config"] == config and r["lr"] == LR[arm] and r["sampled_kl"] <= budget:
            out[r["world"], r["seed"]] = max(out.get((r["world"], r["seed"]), -1.0), r["win_rate"])
    return out


def betas(estimator):
    """The configurations of LoRA's runs with this penalty, by beta ("kl" -> ["kl@0.02", "kl@0.1"])."""
    return sorted((c for c in CONFIGS + JS if c.startswith(estimator + "@")), key=lambda c: float(c.split("@")[1]))


def frontier(rows, estimator, budget):
    """{(world, seed): the best win rate within the budget over LoRA's runs with the penalty at any of its betas,
    beta 0 (no penalty) included}: a penalty judged at matched KL, not at matched beta."""
    runs = [r for r in (within(rows, "lora", c, budget) for c in ["none"] + betas(estimator)) if r]  # those that ran
    keys = set.intersection(*(set(r) for r in runs)) if runs else set()
    return {k: max(r[k] for r in runs) for k in keys}


def paired(a, b):
    """Mean ± nested SE of a - b over the (world, seed) pairs both have: the same world, seed and prompts."""
    return nested({k: a[k] - b[k] for k in a.keys() & b.keys()})


# -----------------------------------------------------------------------------
# report

def fmt(ms, digits=1, sign=False):
    return sweep.fmt(ms, digits, sign)


def worlds_agree(a, b):
    """'k/n worlds': in how many worlds the mean paired difference a - b has the sign of the overall mean (a world
    with no difference agrees with neither sign)."""
    diff = {k: a[k] - b[k] for k in a.keys() & b.keys()}
    overall, pw = nested(diff)[0], per_world(diff)
    sign = lambda x: 0 if abs(x) < 1e-9 else (1 if x > 0 else -1)  # a tie (to float noise) has no sign
    return f"{sum(sign(d) == sign(overall) != 0 for d in pw.values())}/{len(pw)} worlds" if pw else ""


def grid_runs(rows, arm):
    """{lr: the grid run's evaluations, by step} of one arm (world 0, seed 0, no penalty)."""
    out = {}
    for r in rows:
        if (r["arm"], r["world"], r["seed"], r["config"]) == (arm, 0, 0, "none") and r["lr"] in GRID[arm]:
            out.setdefault(r["lr"], []).append(r)
    return {lr: sorted(rs, key=lambda r: r["step"]) for lr, rs in out.items()}


def grid_choice(rows, arm):
    """The grid's learning rate whose run reaches the highest gold win rate at any evaluated step (None: no runs)."""
    runs = grid_runs(rows, arm)
    return max(runs, key=lambda lr: max(r["win_rate"] for r in runs[lr])) if runs else None


def grid_table(rows):
    lines = ["| arm | lr | best win rate (%) at step | final win rate (%) | final greedy KL | final sampled KL | "
             "final accuracy (%) |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        for lr, mine in sorted(grid_runs(rows, arm).items()):
            best, last = max(mine, key=lambda r: r["win_rate"]), mine[-1]
            chosen = " (chosen)" if lr == LR[arm] else ""
            lines.append(f"| {arm} | {lr:g}{chosen} | {best['win_rate']:.1f} at {best['step']} | "
                         f"{last['win_rate']:.1f} | {last['greedy_kl']:.2f} | {last['sampled_kl']:.2f} | "
                         f"{last['accuracy']:.1f} |")
    note = "World 0, PPO seed 0, no penalty, one run per cell: the grid chooses, it does not measure."
    sft = [r["accuracy"] for r in rows if (r["world"], r["step"]) == (0, 0)]
    return lines + ["", note + (f" The SFT policy's accuracy: {sft[0]:.1f}%." if sft else "")]


def main_table(rows):
    lines = ["| arm | penalty | runs | win rate (%) at the best step | final win rate (%) | per world | "
             "greedy KL | sampled KL | accuracy (%) | reward score |", "|---|---|---|---|---|---|---|---|---|---|"]
    sft = at(rows, "lora", "none", "win_rate", 0), at(rows, "lora", "none", "accuracy", 0)
    if sft[0]:
        pw = per_world(sft[0])
        lines.append(f"| SFT (step 0) | | {len(pw)} worlds | | {fmt(nested(sft[0]))} | "
                     f"{' / '.join(f'{v:.1f}' for v in pw.values())} | 0 | 0 | {fmt(nested(sft[1]))} | |")
    for arm in ARMS:
        for c in CONFIGS:
            win = at(rows, arm, c, "win_rate")
            if not win:
                continue
            b = best_step(rows, arm, c)
            lines.append(f"| {arm} (lr {LR[arm]:g}) | {c} | {len(win)} | {fmt(nested(at(rows, arm, c, 'win_rate', b)))}"
                         f" at {b} | {fmt(nested(win))} | {' / '.join(f'{v:.1f}' for v in per_world(win).values())} | "
                         f"{fmt(nested(at(rows, arm, c, 'greedy_kl')), 2)} | "
                         f"{fmt(nested(at(rows, arm, c, 'sampled_kl')), 2)} | "
                         f"{fmt(nested(at(rows, arm, c, 'accuracy')))} | {fmt(nested(at(rows, arm, c, 'score')), 3)} |")
    return lines + ["", "Each cell: mean ± standard error over the worlds' means (each the mean of its PPO seeds), so "
                    "the SE spans the world draw and PPO's seed. Final: step 60. Best step: where the mean curve "
                    "peaks. Per world: the final win rate of worlds 0 / 1 / 2. Greedy KL: exact KL(policy || "
                    "reference) summed over the greedy responses to the 500 evaluation prompts; sampled KL: the same "
                    "over the policy's own samples (the rollouts of the 5 steps up to the evaluation). Accuracy: the "
                    "checker's, the world's factuality (the paper's Table 2 in miniature)."]


def claims_table(rows):
    """The paper's claims as paired differences within a world (same world, seed and prompts), beside the paper's
    own number where it ran the comparison (its full fine-tuning: AlpacaFarm's released PPO checkpoint)."""
    def final(arm, c, field="win_rate"):
        return at(rows, arm, c, field)
    lines = ["| claim | paper | difference | world: mean ± SE | holds in |", "|---|---|---|---|---|"]

    def add(question, paper, what, a, b, digits=1):
        if a and b and a.keys() & b.keys():
            lines.append(f"| {question} | {paper} | {what} | {fmt(paired(a, b), digits, sign=True)} | "
                         f"{worlds_agree(a, b)} |")

    best = {(arm, c): at(rows, arm, c, "win_rate", best_step(rows, arm, c)) for arm in MAIN for c in CONFIGS
            if at(rows, arm, c, "win_rate")}
    for c, paper in (("kl@0.1", "+0.8 (47.5 vs 46.7)"), ("none", "not run")):
        add(f"1. LoRA ≥ full, {c}", paper, "final win, lora - full", final("lora", c), final("full", c))
        add(f"1. LoRA ≥ full, {c}", paper, "best-step win, lora - full", best.get(("lora", c)),
            best.get(("full", c)))
    for arm, paper in (("lora", "-1.5 (46.7 vs 48.2)"), ("full", "not run")):
        add(f"2. penalty not needed, {arm}", paper, "final win, kl@0.1 - none", final(arm, "kl@0.1"),
            final(arm, "none"))
    effect = {arm: {k: final(arm, "kl@0.1")[k] - final(arm, "none")[k]
                    for k in final(arm, "kl@0.1").keys() & final(arm, "none").keys()} for arm in MAIN}
    for c in CONFIGS:
        add(f"1. LoRA ≥ full, {c}, ≤ {BUDGET:g} nat", "not run", "best win within the KL, lora - full",
            within(rows, "lora", c, BUDGET), within(rows, "full", c, BUDGET))
    add(f"Table 1. JS ≥ KL, ≤ {BUDGET:g} nat", "+3.1 (49.8 vs 46.7)", "best win within the KL, js - kl",
        frontier(rows, "js", BUDGET), frontier(rows, "kl", BUDGET))
    add("2. LoRA replaces the penalty", "not run", "penalty's gain, full - lora", effect["full"], effect["lora"])
    add("2. LoRA holds the policy near", "conjecture", "sampled KL (nats), none, lora - full",
        final("lora", "none", "sampled_kl"), final("full", "none", "sampled_kl"), 2)
    papers = {("full", "kl@0.1"): "-5.2 (34.5 vs 39.7)", ("full", "none"): "not run",
              ("lora", "kl@0.1"): "-0.3 (39.4 vs 39.7)", ("lora", "none"): "-1.3 (38.4 vs 39.7)"}
    for arm in MAIN:
        for c in CONFIGS:
            add(f"3. PPO costs factuality, {arm} {c}", papers[arm, c], "accuracy, final - SFT",
                final(arm, c, "accuracy"), at(rows, arm, c, "accuracy", 0))
    for c, paper in (("kl@0.1", "+4.9 (39.4 vs 34.5)"), ("none", "not run")):
        add(f"3. LoRA keeps more, {c}", paper, "final accuracy, lora - full", final("lora", c, "accuracy"),
            final("full", c, "accuracy"))
    return lines + ["", "Win rates and accuracy in points, KL in nats per response. Paper: its difference, from its "
                    "Table 1 (win rate against text-davinci-003) and Table 2 (FActScore); its penalty is the clamped "
                    "KL at beta 0.02, ours the KL at beta 0.1, the world's best (both equal there). Paired by (world, "
                    "seed): the difference within each run pair, averaged over seeds per world; mean ± SE over the "
                    "worlds. Holds in: the worlds whose mean difference has the overall sign."]


def budget_table(rows):
    """Each arm's best win rate within budgets of sampled KL: what a nat of distance from the reference buys."""
    head = " | ".join(f"≤ {b:g} nats (%)" for b in BUDGETS)
    lines = [f"| arm | penalty | {head} | vs full at ≤ {BUDGET:g} |", "|---|---|" + "---|" * len(BUDGETS) + "---|"]
    for arm in sorted(ARMS, key=fraction):
        for c in CONFIGS:
            if not at(rows, arm, c, "win_rate"):
                continue
            mine, full = within(rows, arm, c, BUDGET), within(rows, "full", c, BUDGET)
            vs = f"{fmt(paired(mine, full), sign=True)} ({worlds_agree(mine, full)})" if arm != "full" and full else ""
            lines.append(f"| {arm} | {c} | " + " | ".join(fmt(nested(within(rows, arm, c, b))) for b in BUDGETS) +
                         f" | {vs} |")
    return lines + ["", "Per run, the highest win rate among its evaluations (every 10 steps) whose sampled KL is "
                    "within the budget; mean ± SE over the worlds' means; vs full: paired by (world, seed) in points."]


def js_table(rows):
    """LoRA with the paper's JS beside the KL: each beta's run, then each penalty's frontier at matched KL."""
    head = " | ".join(f"≤ {b:g} nats (%)" for b in BUDGETS)
    lines = [f"| LoRA, penalty | final win rate (%) | final sampled KL | {head} |",
             "|---|---|---|" + "---|" * len(BUDGETS)]
    for c in ["none"] + betas("kl") + betas("js"):
        if at(rows, "lora", c, "win_rate"):
            lines.append(f"| {c} | {fmt(nested(at(rows, 'lora', c, 'win_rate')))} | "
                         f"{fmt(nested(at(rows, 'lora', c, 'sampled_kl')), 2)} | " +
                         " | ".join(fmt(nested(within(rows, "lora", c, b))) for b in BUDGETS) + " |")
    for est in ("kl", "js"):
        if frontier(rows, est, BUDGET):
            lines.append(f"| {est}, best beta within the budget | | | " +
                         " | ".join(fmt(nested(frontier(rows, est, b))) for b in BUDGETS) + " |")
    if frontier(rows, "js", BUDGET) and frontier(rows, "kl", BUDGET):
        lines.append("| js - kl, paired | | | " + " | ".join(
            f"{fmt(paired(frontier(rows, 'js', b), frontier(rows, 'kl', b)), sign=True)}" for b in BUDGETS) + " |")
    return lines + ["", f"LoRA at lr {LR['lora']:g}, {STEPS} steps; each penalty at beta 0 and two betas spanning the "
                    "same range of KL (JS's 25 times the KL's). A frontier cell: per run pair, the best win rate "
                    "within the budget over the penalty's betas; mean ± SE over the worlds' means."]


def fraction(arm):
    """The share of the small world's SFT model (world 0's shape) that the arm's policy trains, in %."""
    import torch
    import llama
    import lora
    from world.build import WorldConfig
    with torch.device("meta"):
        model = llama.Llama(WorldConfig().model(WorldConfig().vocab_size))
    if arm == "full":
        return 100.0
    flags = dict(zip(ARMS[arm][::2], ARMS[arm][1::2]))
    targets = lora.TARGETS if flags.get("--lora-targets") == "all" else ("wq", "wk", "wv", "wo")
    lora.add_lora(model, rank=int(flags.get("--lora-rank", 8)), targets=targets)
    n_lora, n_all = lora.count_parameters(model)
    return 100 * n_lora / (n_all - n_lora)


def ranks_table(rows):
    """Without a penalty, the trainable fraction as the variable: does less of the model training hold it closer?"""
    lines = ["| arm | trains | lr | final win rate (%) | vs full (points) | best (%) at step | sampled KL | "
             "greedy KL | accuracy (%) |", "|---|---|---|---|---|---|---|---|---|"]
    full = at(rows, "full", "none", "win_rate")
    for arm in sorted(ARMS, key=fraction):
        win = at(rows, arm, "none", "win_rate")
        if not win:
            continue
        b = best_step(rows, arm, "none")
        vs = "" if arm == "full" else f"{fmt(paired(win, full), sign=True)} ({worlds_agree(win, full)})"
        lines.append(f"| {arm} | {fraction(arm):.2f}% | {LR[arm]:g} | {fmt(nested(win))} | {vs} | "
                     f"{fmt(nested(at(rows, arm, 'none', 'win_rate', b)))} at {b} | "
                     f"{fmt(nested(at(rows, arm, 'none', 'sampled_kl')), 2)} | "
                     f"{fmt(nested(at(rows, arm, 'none', 'greedy_kl')), 2)} | "
                     f"{fmt(nested(at(rows, arm, 'none', 'accuracy')))} |")
    return lines + ["", "No penalty, each arm at its learning rate; trains: the share of the SFT model's weights the "
                    "policy trains. Cells as above; vs full: paired by (world, seed), with the worlds that agree."]


def curves(rows, arm, c, field):
    steps = sorted({r["step"] for r in rows if r["arm"] == arm and r["config"] == c and r["lr"] == LR[arm]})
    stats = [nested(at(rows, arm, c, field, s)) for s in steps]
    return steps, [m for m, _ in stats], [0.0 if math.isnan(s) else s for _, s in stats]


def figure(plt, rows, out, lines, name):
    """Win rate over steps, sampled KL over steps, and win rate against sampled KL, one line per (arm, config)."""
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4))
    colors = dict(zip(ARMS, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))
    one_arm = len({arm for arm, _ in lines}) == 1  # then the colour tells the configurations apart
    for i, (arm, c) in enumerate(lines):
        steps, win, se = curves(rows, arm, c, "win_rate")
        if not steps:
            continue
        color = f"C{i}" if one_arm else colors[arm]
        style = dict(ls="--" if c == "none" else "-", color=color, label=f"{arm} (lr {LR[arm]:g}), {c}")
        left.plot(steps, win, **style)
        left.fill_between(steps, [m - s for m, s in zip(win, se)], [m + s for m, s in zip(win, se)],
                          color=color, alpha=0.15)
        kl = curves(rows, arm, c, "sampled_kl")[1]
        mid.plot(steps, kl, **style)
        right.plot(kl, win, marker="o", ms=3, **style)
    left.set(xlabel="PPO step", ylabel="gold win rate (%)", title="Win rate (mean ± SE over worlds)")
    mid.set(xlabel="PPO step", ylabel="sampled KL to the reference (nats/response)",
            title="Distance from the reference")
    right.set(xlabel="sampled KL (nats/response)", ylabel="gold win rate (%)", title="Win rate against KL")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.join(out, name)}")


def figures(rows, out):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return print("figures skipped: matplotlib is not installed (pip install matplotlib)")
    figure(plt, rows, out, [(arm, c) for arm in MAIN for c in CONFIGS], "full_vs_lora.png")
    figure(plt, rows, out, [(arm, "none") for arm in sorted(ARMS, key=fraction)], "trainable_fraction.png")
    figure(plt, rows, out, [("lora", c) for c in ["none"] + betas("kl") + betas("js")], "js_vs_kl.png")


def report(rows, out):
    text = ["# Full fine-tuning beside LoRA in the small world (written by `python -m tools.thesis report`)", "",
            "## The learning-rate grid", ""] + grid_table(rows) + \
           ["", "## Each arm at its learning rate", ""] + main_table(rows) + \
           ["", "## The paper's claims, paired", ""] + claims_table(rows) + \
           ["", "## Win rate within a KL budget", ""] + budget_table(rows) + \
           ["", "## The paper's JS beside the KL, at matched KL (LoRA)", ""] + js_table(rows) + \
           ["", "## LoRA's trainable fraction as the variable (no penalty)", ""] + ranks_table(rows)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    figures(rows, out)


def main(argv=None):
    p = config.Parser(description="Full fine-tuning beside LoRA, with and without the KL penalty, over worlds and "
                                  "seeds (the paper's thesis in the small world).")
    p.add_argument("what", choices=["lr", "main", "ranks", "js", "report"])
    p.add_argument("--out", default="runs/thesis", help="the runs' directory")
    p.add_argument("--docs", default="docs/thesis", help="where runs.csv, tables.md and the figures go")
    p.add_argument("--from-csv", action="store_true", help="report: read DOCS/runs.csv instead of the runs")
    args = p.parse_args(argv)
    every = experiment("lr") + experiment("main") + experiment("ranks") + experiment("js")
    failed = [] if args.what == "report" else run(args.out, experiment(args.what))
    csv_path = os.path.join(args.docs, "runs.csv")
    if args.from_csv:
        rows = read_csv(csv_path)
    else:
        rows = rows_of(args.out, list(dict.fromkeys(every)))
        if not rows:
            raise ValueError(f"{args.out}: no run has logged an evaluation yet")
        write_csv(csv_path, rows)
        print(f"wrote {csv_path} ({len(rows)} evaluations)")
    report(rows, args.docs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(exits.script(main, "interrupted (SIGINT): the runs stopped with their last finished step saved; the same "
                                "command resumes them"))
