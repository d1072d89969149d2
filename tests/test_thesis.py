"""tools/thesis.py without training: the nested standard error and the paired differences against a hand
computation, the runs it plans (each a valid train.py command in its own directory), the CSV's sampled KL and its
round trip, the claims table, the win rate within a KL budget and a penalty's frontier on synthetic runs, and the
committed results against the code and the README."""
import importlib.util
import json
import math
import os
import random
import statistics

import pytest

from tools import sweep, thesis


def test_nested_se_is_the_se_of_the_world_means():
    values = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 5.0, (1, 1): 7.0, (2, 0): 0.0, (2, 1): 2.0}
    mean, se = thesis.nested(values)  # world means 2, 6, 1
    assert mean == pytest.approx(3.0, abs=1e-12)
    assert se == pytest.approx(statistics.stdev([2.0, 6.0, 1.0]) / math.sqrt(3), abs=1e-12)
    assert thesis.per_world(values) == {0: 2.0, 1: 6.0, 2: 1.0}
    b = {k: v - (1.0 if k[0] < 2 else -2.0) for k, v in values.items()}  # a - b: 1, 1, -2 per world
    assert thesis.paired(values, b)[0] == pytest.approx(0.0, abs=1e-12)
    assert thesis.worlds_agree(values, {k: 0.0 for k in values}) == "3/3 worlds"
    assert thesis.worlds_agree({k: v - 2.5 for k, v in values.items()}, {k: 0.0 for k in values}) == "1/3 worlds"
    tie = {k: v - (2.0 if k[0] == 0 else 0.0) for k, v in values.items()}  # world 0's mean difference is 0 (a tie)
    assert thesis.worlds_agree(tie, {k: 0.0 for k in values}) == "2/3 worlds"


def test_runs_are_valid_train_commands_in_distinct_directories(tmp_path):
    for name, n in (("lr", sum(map(len, thesis.GRID.values()))),
                    ("main", len(thesis.MAIN) * len(thesis.CONFIGS) * len(thesis.WORLDS) * len(thesis.SEEDS)),
                    ("ranks", len(thesis.RANKS) * len(thesis.WORLDS) * len(thesis.SEEDS)),
                    ("js", len(thesis.JS) * len(thesis.WORLDS) * len(thesis.SEEDS))):
        runs = thesis.experiment(name)
        assert len(runs) == n == len(set(runs))
        dirs = [thesis.run_args(str(tmp_path), *key)[0] for key in runs]
        assert len(set(dirs)) == n
        for key in runs:
            targs = thesis.run_args(str(tmp_path), *key)[1]
            sweep.check_train_args(targs)  # raises on a flag train.py refuses
            assert targs[targs.index("--world-seed") + 1] == str(key[0])
            assert targs[targs.index("--lr") + 1] == str(key[2])
            assert ("--finetune" in targs) == (key[1] == "full")
            assert ("--lora-rank" in targs) == (key[1] in ("lora-r1", "lora-r64"))
    assert {k[0] for k in thesis.experiment("main")} == set(thesis.WORLDS)
    assert not set(thesis.experiment("main")) & set(thesis.experiment("ranks"))
    assert not set(thesis.experiment("main")) & set(thesis.experiment("js"))


def test_trainable_fractions_as_train_prints_them():
    """5.44% and 13.61%: the placement lines of the world's runs at rank 8 (attention, all seven projections)."""
    assert [round(thesis.fraction(a), 2) for a in ("lora", "lora-all", "full")] == [5.44, 13.61, 100.0]
    assert thesis.fraction("lora-r1") == pytest.approx(thesis.fraction("lora") / 8)
    assert thesis.fraction("lora-r64") == pytest.approx(thesis.fraction("lora") * 8)


def fake_run(out, key, rng):
    d = thesis.run_args(str(out), *key)[0]
    os.makedirs(d, exist_ok=True)
    lines = []
    for step in range(thesis.STEPS + 1):
        m = {"step": step}
        if step:
            m["true_kl"] = rng.uniform(0, 3)
        if step % thesis.EVAL_EVERY == 0:
            m.update(eval_win_rate=rng.random(), eval_true_kl=rng.uniform(0, 3), eval_score=rng.gauss(0, 1),
                     eval_length=rng.uniform(20, 40), eval_accuracy=rng.random())
        lines.append(m)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in lines)
    return lines


def test_csv_rows_sampled_kl_and_round_trip(tmp_path):
    rng, keys = random.Random(0), thesis.experiment("main")
    lines = {key: fake_run(tmp_path / "runs", key, rng) for key in keys}
    rows = thesis.rows_of(str(tmp_path / "runs"), keys)
    assert len(rows) == len(keys) * (thesis.STEPS // thesis.EVAL_EVERY + 1)
    r = next(r for r in rows if r["step"] == 20 and (r["world"], r["arm"], r["seed"]) == (1, "full", 2)
             and r["config"] == "kl@0.1")
    m = lines[(1, "full", thesis.LR["full"], "kl@0.1", 2)]
    assert r["sampled_kl"] == pytest.approx(sum(m[k]["true_kl"] for k in range(16, 21)) / 5, rel=1e-5)
    assert r["win_rate"] == pytest.approx(100 * m[20]["eval_win_rate"], rel=1e-5)
    assert next(r for r in rows if r["step"] == 0)["sampled_kl"] == 0.0
    thesis.write_csv(str(tmp_path / "docs" / "runs.csv"), rows)
    back = thesis.read_csv(str(tmp_path / "docs" / "runs.csv"))
    assert [(r["world"], r["arm"], r["lr"], r["config"], r["seed"], r["step"]) for r in back] == \
           [(r["world"], r["arm"], r["lr"], r["config"], r["seed"], r["step"]) for r in rows]
    assert back == rows  # the runs' values are stored as the CSV stores them: the tables from either are the same
    assert thesis.budget_table(back) == thesis.budget_table(rows) and thesis.claims_table(back) == \
        thesis.claims_table(rows)


def test_claims_table_pairs_within_worlds(tmp_path):
    """Win rates built so that each claim has a known answer: lora's penalty effect is 0 in every world, full's is
    +6 in worlds 0 and 1 and -3 in world 2."""
    rows = []
    for w, arm, lr, c, s in thesis.experiment("main"):
        for step in (0, 60):
            shift = 0.0 if step == 0 or arm == "lora" or c == "none" else (6.0 if w < 2 else -3.0)
            rows.append(dict(world=w, arm=arm, lr=lr, config=c, seed=s, step=step, win_rate=30 + 5 * w + s + shift,
                             greedy_kl=0.0, sampled_kl=float(arm == "full"), score=0.0, length=30.0,
                             accuracy=50.0 - step / 10))
    lines = thesis.claims_table(rows)
    row = {line.split(" | ")[0][2:] + " / " + line.split(" | ")[2]: line for line in lines if line.startswith("| ")}
    assert "+0.0 ± 0.0 |" in row["2. penalty not needed, lora / final win, kl@0.1 - none"]
    full = row["2. penalty not needed, full / final win, kl@0.1 - none"]
    assert f"+3.0 ± {statistics.stdev([6, 6, -3]) / math.sqrt(3):.1f} | 2/3 worlds |" in full
    assert "| not run |" in full and "| -1.5 (46.7 vs 48.2) |" in row["2. penalty not needed, lora / final win, "
                                                                      "kl@0.1 - none"]
    assert "-1.00 ± 0.00" in row["2. LoRA holds the policy near / sampled KL (nats), none, lora - full"]
    assert "-6.0 ± 0.0 | 3/3 worlds" in row["3. PPO costs factuality, full none / accuracy, final - SFT"]
    thesis.report(rows, str(tmp_path))
    assert "## The paper's claims, paired" in open(tmp_path / "tables.md").read()
    if importlib.util.find_spec("matplotlib"):  # .ci/run installs it
        assert all((tmp_path / f).stat().st_size > 10_000 for f in ("full_vs_lora.png", "js_vs_kl.png"))


def test_win_rate_within_a_kl_budget():
    """The best win rate among a run's evaluations inside the budget, by hand: step 0 always counts, a later and
    higher win rate beyond the budget does not."""
    lr = thesis.LR["lora"]
    evals = {(0, 0): [(0, 30.0, 0.0), (10, 36.0, 0.4), (20, 40.0, 1.5)], (1, 0): [(0, 28.0, 0.0), (10, 25.0, 3.0)]}
    rows = [dict(world=w, arm="lora", lr=lr, config="none", seed=s, step=step, win_rate=win, sampled_kl=kl)
            for (w, s), rs in evals.items() for step, win, kl in rs]
    rows.append(dict(rows[2], lr=lr * 10, sampled_kl=0.0, win_rate=99.0))  # another learning rate: not this arm's
    assert thesis.within(rows, "lora", "none", 1.0) == {(0, 0): 36.0, (1, 0): 28.0}
    assert thesis.within(rows, "lora", "none", 2.0) == {(0, 0): 40.0, (1, 0): 28.0}
    assert thesis.within(rows, "lora", "none", 0.0) == {(0, 0): 30.0, (1, 0): 28.0}


def test_a_penalty_at_matched_kl_is_its_best_beta_within_the_budget():
    """frontier() by hand: per (world, seed), the best of the penalty's runs (beta 0 included) inside the budget; the
    other penalty's runs and a pair missing one of the betas do not count."""
    lr = thesis.LR["lora"]
    runs = {("none", 0): [(0, 30.0, 0.0), (60, 33.0, 2.5)], ("kl@0.1", 0): [(0, 30.0, 0.0), (60, 38.0, 0.6)],
            ("kl@0.02", 0): [(0, 30.0, 0.0), (60, 36.0, 0.9)], ("js@2.5", 0): [(0, 30.0, 0.0), (60, 45.0, 0.5)],
            ("none", 1): [(0, 28.0, 0.0)]}
    rows = [dict(world=0, arm="lora", lr=lr, config=c, seed=s, step=step, win_rate=win, sampled_kl=kl)
            for (c, s), rs in runs.items() for step, win, kl in rs]
    assert thesis.frontier(rows, "kl", 1.0) == {(0, 0): 38.0}
    assert thesis.frontier(rows, "kl", 0.8) == {(0, 0): 38.0}
    assert thesis.frontier(rows, "kl", 0.5) == {(0, 0): 30.0}
    assert thesis.frontier(rows, "kl", 3.0) == {(0, 0): 38.0}
    assert thesis.frontier(rows, "js", 0.5) == {(0, 0): 45.0}  # seed 1 lacks js@2.5; js@0.5 never ran
    assert thesis.frontier(rows, "js", 0.4) == {(0, 0): 30.0}


@pytest.mark.parametrize("text,what", [("", "header"), ("world,arm\n0,full\n", "header"),
                                       (",".join(thesis.FIELDS) + "\n0,full,x,none,0,0,1,1,1,1,1,1\n", "line 2"),
                                       (",".join(thesis.FIELDS) + "\n0,full,1e-3,none,0\n", "line 2")])
def test_a_malformed_csv_is_refused_by_name(tmp_path, text, what):
    path = tmp_path / "runs.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"runs.csv: .*{what}"):
        thesis.read_csv(str(path))
    with pytest.raises(ValueError, match="no such file"):
        thesis.read_csv(str(tmp_path / "absent.csv"))


def test_the_committed_results_match_the_code():
    """docs/thesis/runs.csv, the committed evaluations: each arm's LR is the one its grid runs chose, every run of
    the experiments is there to its last step, and the README's claims rows are the table they make."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = thesis.read_csv(os.path.join(root, "docs", "thesis", "runs.csv"))
    for arm in thesis.ARMS:
        assert thesis.grid_choice(rows, arm) == thesis.LR[arm], arm
        assert min(thesis.GRID[arm]) < thesis.LR[arm] < max(thesis.GRID[arm]), f"{arm}: the choice is at the edge"
    done = {(r["world"], r["arm"], r["lr"], r["config"], r["seed"]) for r in rows if r["step"] == thesis.STEPS}
    for name in ("lr", "main", "ranks", "js"):
        assert set(thesis.experiment(name)) <= done, name
    claims = set(thesis.claims_table(rows))
    with open(os.path.join(root, "README.md")) as f:
        readme = [line for line in f.read().splitlines() if line.startswith(("| 1. ", "| 2. ", "| 3. ", "| Table 1. "))]
    assert len(readme) >= 6
    assert not [line for line in readme if line not in claims], "README claims rows differ from the committed runs"
