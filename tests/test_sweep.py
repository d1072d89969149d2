"""sweep.py without training: the table against a direct computation, the resume decisions, optional matplotlib."""
import json
import math
import os
import random
import statistics
import subprocess
import sys

import pytest

import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS, SEEDS, STEPS, EVAL_EVERY = ["js", "none"], [0, 1], 4, 2
EVAL_KEYS = ("eval_win_rate", "eval_win_rate_se", "eval_accuracy", "eval_score", "eval_true_kl", "eval_length")


def fake_metrics(name, seed, steps=STEPS):
    """metrics.jsonl lines as train.py writes them; step 0 (the SFT policy) depends on the seed only."""
    lines = []
    for step in range(steps + 1):
        rng = random.Random(f"{name if step else 'sft'}-{seed}-{step}")
        m = {"step": step}
        if step > 0:
            m.update(true_kl=rng.uniform(0, 2), score=rng.gauss(0, 1), response_length=rng.uniform(3, 9),
                     penalty=rng.uniform(0, 0.1))
        if step % EVAL_EVERY == 0 or step == steps:
            m.update(zip(EVAL_KEYS, (rng.random(), rng.uniform(0.02, 0.03), rng.random(), rng.gauss(0, 1),
                                     rng.uniform(0, 3), rng.uniform(3, 9))))
        lines.append(m)
    return lines


def write_run(out, name, seed, lines, args=None):
    run = sweep.run_dir(str(out), name, seed)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in lines)
    if args is not None:
        with open(os.path.join(run, "sweep.json"), "w") as f:
            json.dump({"train_args": args}, f)
    return run


@pytest.fixture
def fake_sweep(tmp_path):
    for name in CONFIGS:
        for s in SEEDS:
            write_run(tmp_path, name, s, fake_metrics(name, s))
    return tmp_path


def test_table_means_and_standard_errors(fake_sweep, monkeypatch):
    monkeypatch.setattr(sweep, "plot", lambda out, runs: [])
    rows = sweep.report(str(fake_sweep), CONFIGS)
    assert [r["label"] for r in rows] == ["SFT policy (step 0)", "Jensen-Shannon", "No regularization"]
    table = open(fake_sweep / "table1.md").read()
    for row, name, step in zip(rows, ["sft", "js", "none"], [0, STEPS, STEPS]):
        finals = [fake_metrics("js" if name == "sft" else name, s)[step] for s in SEEDS]
        assert row["seeds"] == SEEDS and row["steps"] == [step]
        for key in ("eval_win_rate",) + EVAL_KEYS[2:]:
            xs = [m[key] for m in finals]
            mean, se = row[key]  # statistics.stdev has the n - 1 denominator
            assert mean == pytest.approx(statistics.mean(xs), abs=1e-12), (name, key)
            assert se == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)), abs=1e-12), (name, key)
        w = [m["eval_win_rate"] for m in finals]
        cells = f"| {100 * statistics.mean(w):.1f} ± {100 * statistics.stdev(w) / math.sqrt(2):.1f} | " \
                f"{100 * w[0]:.1f}, {100 * w[1]:.1f} |"
        assert cells in table, (name, cells)
    assert "n - 1" in table and "standard error over seeds" in table


def test_one_seed_and_missing_keys_and_unfinished_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "plot", lambda out, runs: [])
    lines = [{k: v for k, v in m.items() if not k.startswith("eval_win")} for m in fake_metrics("kl", 3)]
    write_run(tmp_path, "kl", 3, lines)  # no simulated annotator (real checkpoints): no win rate
    write_run(tmp_path, "js", 0, fake_metrics("js", 0)[:2])  # killed after step 1: no evaluation after step 0
    rows = sweep.report(str(tmp_path), ["kl", "js", "bregman"])
    assert [r["label"] for r in rows] == ["SFT policy (step 0)", "KL"]
    assert rows[1]["eval_win_rate"][0] is None and math.isnan(rows[1]["eval_score"][1])  # one seed: no SE
    assert rows[1]["eval_score"][0] == pytest.approx(lines[STEPS]["eval_score"])
    assert "| n/a | n/a |" in open(tmp_path / "table1.md").read()
    with pytest.raises(ValueError, match="no run of bregman"):
        sweep.report(str(tmp_path), ["bregman"])


def test_plan_skips_complete_resumes_with_checkpoint_restarts_otherwise(tmp_path):
    args = sweep.train_args("js", 0, STEPS, 0.02, str(tmp_path), [])
    run = write_run(tmp_path, "js", 0, fake_metrics("js", 0), args)
    assert sweep.plan(run, args, STEPS) == "skip"
    assert sweep.plan(run, args + ["--lr", "1e-3"], STEPS) == "start"  # other arguments: run again
    assert sweep.plan(run, args, STEPS + 2) == "start"  # more steps asked, no checkpoint
    write_run(tmp_path, "js", 0, fake_metrics("js", 0)[:3], args)  # stopped after step 2
    assert sweep.plan(run, args, STEPS) == "start"
    os.makedirs(os.path.join(run, "checkpoint.old"))  # a crash between checkpoint renames leaves only .old
    open(os.path.join(run, "checkpoint.old", "state.pt"), "w").close()
    assert sweep.plan(run, args, STEPS) == "resume"
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": STEPS})[:5])  # a line cut off by a kill does not count
    assert sweep.plan(run, args, STEPS) == "resume"
    os.remove(os.path.join(run, "sweep.json"))  # not started by the sweep: start it under the sweep's command
    assert sweep.plan(run, args, STEPS) == "start"


def test_sweep_builds_commands_and_skips_finished_runs(tmp_path, monkeypatch):
    calls = []

    def fake_train(args, run, prefix):  # stands in for train.py: logs the run's metrics
        calls.append(args)
        i = args.index("--seed")
        write_run(tmp_path, os.path.basename(os.path.dirname(run)), int(args[i + 1]), fake_metrics("x", 0))
        return 0

    monkeypatch.setattr(sweep, "run_train", fake_train)
    monkeypatch.setattr(sweep, "plot", lambda out, runs: [])
    argv = ["--configs", "js", "dropout", "--seeds", "0", "--steps", str(STEPS), "--out", str(tmp_path), "--",
            "--rollout-batch-size", "8"]
    assert sweep.main(argv) == 0
    out = lambda name: ["--out", os.path.join(str(tmp_path), name, "seed0"), "--rollout-batch-size", "8"]
    assert calls == [["--estimator", "js", "--kl-coef", "0.02", "--seed", "0", "--steps", str(STEPS)] + out("js"),
                     ["--estimator", "none", "--lora-dropout", "0.5", "--seed", "0", "--steps", str(STEPS)] + out("dropout")]
    calls.clear()
    assert sweep.main(argv) == 0 and calls == [], "finished runs must be skipped"
    run = sweep.run_dir(str(tmp_path), "js", 0)
    write_run(tmp_path, "js", 0, fake_metrics("x", 0)[:2])
    os.makedirs(os.path.join(run, "checkpoint"))
    open(os.path.join(run, "checkpoint", "state.pt"), "w").close()
    assert sweep.main(argv) == 0
    assert len(calls) == 1 and calls[0][-1] == "--resume" and calls[0][calls[0].index("--out") + 1] == run
    with pytest.raises(ValueError, match="--seed"):
        sweep.main(argv + ["--seed", "3"])


def test_missing_matplotlib_still_writes_the_table(fake_sweep, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    sweep.report(str(fake_sweep), CONFIGS)
    assert "plots skipped: matplotlib is not installed (pip install matplotlib)" in capsys.readouterr().out
    assert (fake_sweep / "table1.md").exists() and not list(fake_sweep.glob("*.png"))


def test_plots_when_matplotlib_is_installed(fake_sweep):
    pytest.importorskip("matplotlib")  # optional extra: CI does not install it
    sweep.report(str(fake_sweep), CONFIGS)
    for f in (fake_sweep / "figure1_win_rate.png", fake_sweep / "figure2_true_kl.png"):
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n", f


def test_bad_input_is_one_line(tmp_path):
    write_run(tmp_path, "kl", 0, fake_metrics("kl", 0))
    with open(tmp_path / "kl" / "seed0" / "metrics.jsonl", "r+") as f:
        f.write("{oops")  # corrupts the first line
    for args, msg in ((["--report-only", "--out", str(tmp_path / "empty")], "no run of"),
                      (["--report-only", "--out", str(tmp_path)], "metrics.jsonl: line 1 is not JSON")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *args], capture_output=True, text=True)
        assert p.returncode == 1 and msg in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
