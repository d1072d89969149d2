"""tools/sweep.py without training: its statistics against a hand computation, configurations, resume decisions, the
parallel runner with a stand-in for train.py, and optional matplotlib."""
import json
import math
import os
import re
import random
import statistics
import subprocess
import sys

import pytest

from tools import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS, SEEDS, STEPS, EVAL_EVERY = ["js", "none", "kl", "kl@0.5", "js@0.5", "kl@0.1"], [0, 1, 2], 4, 2
EVAL_KEYS = ("eval_win_rate", "eval_win_rate_se", "eval_accuracy", "eval_score", "eval_true_kl", "eval_length")


def fake_metrics(name, seed, steps=STEPS):
    """metrics.jsonl lines as train.py writes them; step 0 (the SFT policy) depends on the seed only."""
    lines = []
    for step in range(steps + 1):
        rng = random.Random(f"{name if step else 'sft'}-{seed}-{step}")
        m = {"step": step}
        if step > 0:
            m.update(true_kl=rng.uniform(0, 2), score=rng.gauss(0, 1), response_length=rng.uniform(20, 40))
        if step % EVAL_EVERY == 0 or step == steps:
            m.update(zip(EVAL_KEYS, (rng.random(), rng.uniform(0.02, 0.03), rng.random(), rng.gauss(0, 1),
                                     rng.uniform(0, 3), rng.uniform(20, 40))))
        lines.append(m)
    return lines


def write_run(out, spec, seed, lines, args=None):
    run = sweep.run_dir(str(out), spec, seed)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in lines)
    if args is not None:
        with open(os.path.join(run, "sweep.json"), "w") as f:
            json.dump({"train_args": args}, f)
    return run


@pytest.fixture
def fake_sweep(tmp_path):
    for spec in CONFIGS:
        for s in SEEDS:
            write_run(tmp_path, spec, s, fake_metrics(spec, s))
    return tmp_path


def test_table_statistics_against_a_hand_computation(fake_sweep, monkeypatch):
    monkeypatch.setattr(sweep, "plot", lambda out, runs, kl_coef: [])
    rows, beta_rows = sweep.report(str(fake_sweep), CONFIGS, 0.02)
    assert [r["name"] for r in rows] == ["kl", "js", "none"]  # the paper's order; both betas in one row
    final = {spec: [fake_metrics(spec, s)[STEPS] for s in SEEDS] for spec in CONFIGS}
    win = lambda spec: [100 * m["eval_win_rate"] for m in final[spec]]
    by_name = {r["name"]: r for r in rows}
    for name, spec, cell in (("js", "js", 0), ("kl", "kl", 0), ("kl", "kl@0.5", 1), ("js", "js@0.5", 1),
                             ("none", "none", 0)):
        c = by_name[name]["cells"][cell]
        assert c["seeds"] == SEEDS
        mean, se = c["win"]  # statistics.stdev has the n - 1 denominator
        assert mean == pytest.approx(statistics.mean(win(spec)), abs=1e-9)
        assert se == pytest.approx(statistics.stdev(win(spec)) / math.sqrt(len(SEEDS)), abs=1e-9)
        if name != "none":  # paired by seed: the standard error of the per-seed differences
            d = [a - b for a, b in zip(win(spec), win("none"))]
            assert c["vs_none"][0] == pytest.approx(statistics.mean(d), abs=1e-9)
            assert c["vs_none"][1] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)), abs=1e-9)
        kl = [m["eval_true_kl"] for m in final[spec]]
        assert c["kl"][0] == pytest.approx(statistics.mean(kl), abs=1e-12)
    assert by_name["none"]["cells"][1]["win"] == by_name["none"]["cells"][0]["win"], "no penalty: in both columns"
    assert len(by_name["kl"]["cells"]) == 2, "beta 0.1 ran for KL only: not a Table-1 column"
    table = open(fake_sweep / "table1.md").read()
    d = [a - b for a, b in zip(win("js"), win("none"))]
    cells = (f"| Jensen-Shannon | 49.8 ± 0.3 | {statistics.mean(win('js')):.1f} ± "
             f"{statistics.stdev(win('js')) / math.sqrt(3):.1f} | {statistics.mean(d):+.1f} ± {statistics.stdev(d) / math.sqrt(3):.1f} |")
    assert cells in table, cells
    assert "β = 0.02: win rate (%)" in table and "β = 0.5: win rate (%)" in table and "n - 1" in table
    assert [r["beta"] for r in beta_rows] == [0.0, 0.02, 0.1, 0.5]
    beta = open(fake_sweep / "beta.md").read()
    assert beta.count("\n| ") == 4 and "| 0.1 | 3 |" in beta


def test_configurations_and_their_commands():
    assert sweep.parse_config("kl@0.1", 0.02) == ("kl", 0.1) and sweep.parse_config("js", 0.02) == ("js", 0.02)
    assert sweep.parse_config("dropout", 0.02) == ("dropout", 0.0)
    for bad, msg in (("none@0.1", "no penalty"), ("kl@x", "not a number"), ("foo", "not one of")):
        with pytest.raises(ValueError, match=msg):
            sweep.parse_config(bad, 0.02)
    args = sweep.train_args("kl@0.1", 3, 60, 0.02, 1e-3, "runs/s", ["--rollout-batch-size", "32"])
    assert args == ["--estimator", "kl", "--kl-coef", "0.1", "--seed", "3", "--steps", "60", "--lr", "0.001", "--out",
                    os.path.join("runs/s", "kl@0.1", "seed3"), "--rollout-batch-size", "32"]
    assert sweep.train_args("dropout", 0, 5, 0.02, 1e-3, "o", []) == [
        "--estimator", "none", "--lora-dropout", "0.5", "--seed", "0", "--steps", "5", "--lr", "0.001", "--out",
        "o/dropout/seed0"]
    assert all(sweep.parse_config(s, 0.02) for s in sweep.DEFAULT) and len(set(sweep.DEFAULT)) == len(sweep.DEFAULT)


def test_one_seed_and_missing_keys_and_unfinished_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "plot", lambda out, runs, kl_coef: [])
    lines = [{k: v for k, v in m.items() if not k.startswith("eval_win")} for m in fake_metrics("kl", 3)]
    write_run(tmp_path, "kl", 3, lines)  # no simulated annotator (real checkpoints): no win rate
    write_run(tmp_path, "js", 0, fake_metrics("js", 0)[:2])  # killed after step 1: no evaluation after step 0
    rows, _ = sweep.report(str(tmp_path), ["kl", "js", "bregman"], 0.02)
    assert [r["label"] for r in rows] == ["KL"]
    c = rows[0]["cells"][0]
    assert c["win"][0] is None and math.isnan(c["kl"][1])  # one seed: no standard error
    assert c["kl"][0] == pytest.approx(lines[STEPS]["eval_true_kl"])
    assert "| KL | 46.7 ± 0.02 | n/a |" in open(tmp_path / "table1.md").read()
    with pytest.raises(ValueError, match="no run of bregman"):
        sweep.report(str(tmp_path), ["bregman"], 0.02)


def test_plan_skips_complete_resumes_with_checkpoint_restarts_otherwise(tmp_path):
    args = sweep.train_args("js", 0, STEPS, 0.02, 1e-3, str(tmp_path), [])
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


class FakeRun:
    """Stands in for a train.py process: writes the run's metrics and ends after `polls` polls."""
    running = []

    def __init__(self, args, run, threads, polls=2):
        self.args, self.threads, self.polls, self.returncode = args, threads, polls, None
        write_run(os.path.dirname(os.path.dirname(run)), os.path.basename(os.path.dirname(run)),
                  int(args[args.index("--seed") + 1]), fake_metrics("x", 0))
        FakeRun.running.append(self)

    def poll(self):
        self.polls -= 1
        if self.polls <= 0:
            self.returncode = 0
        return self.returncode


def test_sweep_runs_jobs_in_parallel_and_skips_finished_runs(tmp_path, monkeypatch):
    started, most = [], []

    def fake_start(args, run, threads):
        started.append((args, threads))
        most.append(sum(r.returncode is None for r in FakeRun.running) + 1)
        return FakeRun(args, run, threads)

    monkeypatch.setattr(sweep, "start_train", fake_start)
    monkeypatch.setattr(sweep, "plot", lambda out, runs, kl_coef: [])
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    argv = ["--configs", "js", "kl@0.5", "dropout", "--seeds", "0", "--steps", str(STEPS), "--out", str(tmp_path),
            "--jobs", "2", "--threads", "1", "--", "--rollout-batch-size", "8"]
    assert sweep.main(argv) == 0
    out = lambda spec: ["--lr", "0.001", "--out", os.path.join(str(tmp_path), spec, "seed0"), "--rollout-batch-size", "8"]
    assert [a for a, _ in started] == [
        ["--estimator", "js", "--kl-coef", "0.02", "--seed", "0", "--steps", str(STEPS)] + out("js"),
        ["--estimator", "kl", "--kl-coef", "0.5", "--seed", "0", "--steps", str(STEPS)] + out("kl@0.5"),
        ["--estimator", "none", "--lora-dropout", "0.5", "--seed", "0", "--steps", str(STEPS)] + out("dropout")]
    assert max(most) == 2 and {t for _, t in started} == {1}, "two at a time, one thread each"
    started.clear()
    assert sweep.main(argv) == 0 and started == [], "finished runs must be skipped"
    run = sweep.run_dir(str(tmp_path), "js", 0)
    write_run(tmp_path, "js", 0, fake_metrics("x", 0)[:2])
    os.makedirs(os.path.join(run, "checkpoint"))
    open(os.path.join(run, "checkpoint", "state.pt"), "w").close()
    assert sweep.main(argv) == 0
    assert len(started) == 1 and started[0][0][-1] == "--resume" and started[0][0][started[0][0].index("--out") + 1] == run
    for owned in ("--seed", "--lr"):
        with pytest.raises(ValueError, match=owned):
            sweep.main(argv + [owned, "3"])


def test_ctrl_c_stops_every_running_run_with_its_step_saved(tmp_path, monkeypatch):
    """Ctrl-C in the sweep (SIGINT to it alone, or to the whole group) reaches each running train.py as SIGINT,
    which saves its last finished step, and the sweep waits for them before it ends (it used to leave them running
    or count them as failed)."""
    import signal
    procs = []

    class Proc:
        returncode = None

        def __init__(self):
            self.signals, self.waited = [], False

        def poll(self):
            return None

        def send_signal(self, sig):
            self.signals.append(sig)

        def wait(self):
            self.waited = True
    monkeypatch.setattr(sweep, "start_train", lambda args, run, threads: procs.append(Proc()) or procs[-1])
    monkeypatch.setattr(sweep.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    jobs = [(f"[{i}]", str(tmp_path / str(i)), []) for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        sweep.run_all(jobs, 2, 1)
    assert len(procs) == 2 and all(p.signals == [signal.SIGINT] and p.waited for p in procs)


def test_missing_matplotlib_still_writes_the_tables(fake_sweep, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    sweep.report(str(fake_sweep), CONFIGS, 0.02)
    assert "plots skipped: matplotlib is not installed (pip install matplotlib)" in capsys.readouterr().out
    assert (fake_sweep / "table1.md").exists() and (fake_sweep / "beta.md").exists()
    assert not list(fake_sweep.glob("*.png"))


def test_plots_when_matplotlib_is_installed(fake_sweep):
    """The four figures at the sizes plot asks for (figsize x 110 dpi; two Table-1 betas here, 0.02 and 0.5, at
    which two estimators ran), each different, with every curve drawn in its color and none for a configuration
    that did not run."""
    plt = pytest.importorskip("matplotlib.pyplot")  # .ci/run installs matplotlib
    import numpy as np
    from matplotlib.colors import to_rgb
    sweep.report(str(fake_sweep), CONFIGS, 0.02)
    size = {"figure1_win_rate": (440, 2 * 660), "figure2_kl_length": (2 * 396, 1210),
            "figure3_overoptimization": (440, 1210), "figure4_beta": (440, 1210)}   # (height, width) in pixels
    images = {name: plt.imread(fake_sweep / f"{name}.png")[..., :3] for name in size}  # (H, W, 3) in [0, 1]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: to_rgb(c) for name, c in zip(sweep.CONFIGS, cycle)}
    # figure 4: no penalty and the KL penalty at its three betas (0, 0.02, 0.1, 0.5), viridis from 0 to 1
    color.update({f"kl at beta {i}": plt.cm.viridis(i / 3)[:3] for i in range(4)})
    hits = lambda img, c: int((np.abs(img - np.array(c)).max(-1) < 0.02).sum())  # pixels of a curve's color
    for name, img in images.items():
        assert img.shape[:2] == size[name], (name, img.shape)
        drawn = (img < 0.95).any(-1).mean()                               # share of pixels that are not white
        assert 0.01 < drawn < 0.6, (name, drawn)
        curves = [f"kl at beta {i}" for i in range(4)] if name == "figure4_beta" else ["js", "kl", "none"]
        assert all(hits(img, color[c]) > 300 for c in curves), (name, {c: hits(img, color[c]) for c in curves})
        assert hits(img, color["squared"]) == 0, name                     # control: squared did not run
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert images[a].shape != images[b].shape or (images[a] != images[b]).any(), (a, b)


def test_bad_input_is_one_line(tmp_path):
    write_run(tmp_path, "kl", 0, fake_metrics("kl", 0))
    with open(tmp_path / "kl" / "seed0" / "metrics.jsonl", "r+") as f:
        f.write("{oops")  # corrupts the first line
    for args, msg in ((["--report-only", "--out", str(tmp_path / "empty")], "no run of"),
                      (["--report-only", "--out", str(tmp_path), "--configs", "kl"], "metrics.jsonl: line 1 is not JSON"),
                      (["--configs", "none@0.1"], "no penalty"),
                      (["--configs", "kl@-1"], "configuration 'kl@-1': beta must be a finite number >= 0"),
                      (["--threads", "-5"], "--threads must be at least 1, got -5"),
                      # train.py's checks before any run starts (each used to fail in all 65 runs, one by one)
                      (["--seeds", "-1", "--out", str(tmp_path / "s")], "--seed must be in [0, 2**63), got -1"),
                      (["--out", str(tmp_path / "s"), "--", "--bogus", "1"], "unrecognized arguments: --bogus 1")):
        with pytest.raises(ValueError, match=re.escape(msg)):  # in this process; the command line once below
            sweep.main(args)
    for line, msg in (('{"step": 0, "eval_win_rate": "abc"}', 'line 1: eval_win_rate is not a number'),
                      (b'\xff{"step": 0}', "not UTF-8 text")):  # each was a traceback or named no file
        path = tmp_path / "kl" / "seed0" / "metrics.jsonl"
        path.write_bytes(line if isinstance(line, bytes) else line.encode())
        with pytest.raises(ValueError, match=re.escape(f"{path}: {msg}")):
            sweep.main(["--report-only", "--out", str(tmp_path), "--configs", "kl"])
    p = subprocess.run([sys.executable, "-m", "tools.sweep", "--configs", "none@0.1"], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 1 and "no penalty" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
