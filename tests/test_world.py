"""Tests of the built-in small world: tasks, teacher, annotator, and a shrunken bootstrap."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import llama
import reward
import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rec(task, instruction, input=""):
    return {"task": task, "instruction": instruction, "input": input}


# ----------------------------------------------------------------------------- tasks

# hand-written (record, right answer, the teacher's misconception) for every task
GOLDEN = [
    (rec("copy", "Copy the input.", "cat dog sun map"), "cat dog sun map", "cat dog sun"),
    (rec("reverse", "Reverse the order of the words.", "ant bee cup dog"), "dog cup bee ant", "dog cup bee"),
    (rec("upper", "Write the input in uppercase.", "fig hat jam"), "FIG HAT JAM", "FIG HAT jam"),
    (rec("count", "Count the words in the input.", "a b c d e f g"), "7", "6"),
    (rec("first", "What is the first word of the input?", "egg cat cup dog box map"), "egg", "cat"),
    (rec("last", "Which word comes last in the input?", "egg cat cup dog box map"), "map", "box"),
    (rec("larger", "Which number is larger?", "42 47"), "47", "42"),
    (rec("add", "What is 47 plus 5?"), "52", "42"),
]


def test_golden_answers_and_misconceptions():
    assert {r["task"] for r, _, _ in GOLDEN} == set(world.TASKS), "a task has no golden example"
    for r, right, wrong in GOLDEN:
        t = world.TASKS[r["task"]]
        assert world.answer(r) == right, r
        assert t.hard(r["instruction"], r["input"]), f"{r} should be a hard instance"
        assert t.mistake(r["instruction"], r["input"]) == wrong, r
        assert world.check(r, right) and world.check(r, f"  {right}\n"), "whitespace must not matter"
        assert not world.check(r, wrong) and not world.check(r, right + " x") and not world.check(r, ""), r


def test_checker_accepts_answers_rejects_errors_on_generated_records():
    rng = random.Random(0)
    s = world.make_splits(1, n_sft=0, n_pref=800, n_ppo=0, n_eval=0)["pref"]
    for r in s:
        truth = world.answer(r)
        assert world.check(r, truth)
        assert not world.check(r, world.slip(truth, rng)), f"slip of {truth!r} accepted for {r}"
        t = world.TASKS[r["task"]]
        if t.hard(r["instruction"], r["input"]) and t.mistake(r["instruction"], r["input"]) != truth:
            assert not world.check(r, t.mistake(r["instruction"], r["input"]))
    assert {r["task"] for r in s} == set(world.TASKS)
    assert all(bool(r["input"]) == world.TASKS[r["task"]].has_input for r in s), "template choice per task"


def test_splits_deterministic_distinct_and_sized():
    a = world.make_splits(3, 50, 20, 30, 40)
    assert a == world.make_splits(3, 50, 20, 30, 40)
    assert a != world.make_splits(4, 50, 20, 30, 40)
    assert [len(a[k]) for k in ("sft", "pref", "ppo", "eval")] == [50, 20, 30, 40]
    keys = [(r["instruction"], r["input"]) for split in a.values() for r in split]
    assert len(set(keys)) == len(keys), "evaluation prompts must be held out from every training split"
    assert all(set(r) == {"instruction", "input", "task", "output"} for r in a["sft"] + a["eval"])
    assert all(set(r) == {"instruction", "input", "task"} for r in a["pref"] + a["ppo"])


def test_teacher_rates():
    s = world.make_splits(0, 4000, 0, 0, 0, p_hard=0.75, p_slip=0.05)["sft"]
    hard = [r for r in s if world.TASKS[r["task"]].hard(r["instruction"], r["input"])]
    easy = [r for r in s if not world.TASKS[r["task"]].hard(r["instruction"], r["input"])]
    for group, p in ((hard, 0.75), (easy, 0.05)):
        err = sum(not world.check(r, r["output"]) for r in group) / len(group)
        se = math.sqrt(p * (1 - p) / len(group))
        assert abs(err - p) < 4 * se, f"error rate {err:.3f} vs {p} (4 SE = {4 * se:.3f})"
    perfect = world.make_splits(0, 500, 0, 0, 0, p_hard=0.0, p_slip=0.0)["sft"]
    assert all(world.check(r, r["output"]) for r in perfect)


# ----------------------------------------------------------------------------- annotator

def test_edit_distance():
    assert world.edit_distance("kitten", "sitting") == 3
    assert world.edit_distance("", "abc") == 3 and world.edit_distance("abc", "abc") == 0
    assert world.edit_distance("ab", "ba") == 2


def test_annotator_rules():
    r = rec("reverse", "Reverse the order of the words.", "ant bee cup dog")  # truth: "dog cup bee ant"
    assert world.prefer(r, "dog cup bee ant", "dog cup bee") == 1.0  # correct beats incorrect ...
    assert world.prefer(r, "dog cup bee", "dog cup bee ant") == 0.0
    assert world.prefer(r, "dog cup bee ant", "") == 1.0  # ... even when it is longer
    assert world.prefer(r, "dog cup bee", "ant bee cup dog") == 1.0  # both wrong: the closer one
    # "dog cup bee anx" is 1 edit from the truth, the longer-but-padded "dog cup bee ant ant" 4: closer wins
    assert world.prefer(r, "dog cup bee anx", "dog cup bee ant ant") == 1.0
    assert world.prefer(r, "dog cup bee ant ant", "dog cup bee anx") == 0.0
    assert world.prefer(r, "dog cup bee an", "dog cup bee anxx") == 1.0  # equal distance (1): the shorter
    assert world.prefer(r, "dog cup bee  ant", "dog cup bee ant") == 0.5  # identical up to whitespace: tie
    assert world.prefer(r, "dog cup bex", "dog cup bey") == 0.5  # same distance and length: tie


def test_labels_follow_rules_without_noise_and_are_seeded():
    s = world.make_splits(0, 0, 300, 0, 0)["pref"]
    rng = random.Random(1)
    a = [world.answer(r) if rng.random() < 0.5 else world.slip(world.answer(r), rng) for r in s]
    b = [world.slip(world.answer(r), rng) if rng.random() < 0.5 else world.answer(r) for r in s]
    labels = world.label_pairs(s, a, b, noise=0.0, seed=5)
    for r, x, y, lab in zip(s, a, b, labels):
        p = world.prefer(r, x, y)
        if p != 0.5:
            assert lab == (1 if p == 1.0 else 2)
    assert labels == world.label_pairs(s, a, b, noise=0.0, seed=5)
    noisy = world.label_pairs(s, a, b, noise=0.3, seed=5)
    assert noisy == world.label_pairs(s, a, b, noise=0.3, seed=5)
    assert noisy != world.label_pairs(s, a, b, noise=0.3, seed=6)


def test_noise_rate_and_tie_coin_within_standard_errors():
    n, noise = 4000, 0.2
    r = rec("count", "Count the words in the input.", "a b c")
    labels = world.label_pairs([r] * n, ["3"] * n, ["4"] * n, noise=noise, seed=0)
    flipped = sum(lab == 2 for lab in labels) / n
    se = math.sqrt(noise * (1 - noise) / n)
    assert abs(flipped - noise) < 4 * se, f"flip rate {flipped:.4f} vs {noise} (4 SE {4 * se:.4f})"
    ties = world.label_pairs([r] * n, ["5"] * n, ["5"] * n, noise=noise, seed=0)
    first = sum(lab == 1 for lab in ties) / n
    assert abs(first - 0.5) < 4 * math.sqrt(0.25 / n), f"a tie must be a fair coin, got {first:.4f}"


def test_win_rate_matches_float64_and_rules():
    s = world.make_splits(2, 0, 0, 0, 200)["eval"]
    rng = random.Random(0)
    outs = [world.answer(r) if rng.random() < 0.6 else world.slip(world.answer(r), rng) for r in s]
    refs = [r["output"] for r in s]
    mean, se = world.win_rate(s, outs, refs)
    scores = np.array([world.prefer(r, o, y) for r, o, y in zip(s, outs, refs)], dtype=np.float64)
    assert mean == pytest.approx(scores.mean(), abs=1e-12)
    assert se == pytest.approx(scores.std(ddof=1) / math.sqrt(len(scores)), abs=1e-12)
    right = [world.answer(r) for r in s]
    assert world.win_rate(s, right, right) == (0.5, 0.0)  # identical outputs: all ties
    wrong = [world.slip(t, rng) for t in right]
    assert world.win_rate(s, right, wrong) == (1.0, 0.0)
    m, _ = world.win_rate(s, right, wrong, noise=0.25, seed=0)  # noisy annotator: 1 - noise in expectation
    assert abs(m - 0.75) < 4 * math.sqrt(0.25 * 0.75 / len(s))


# ----------------------------------------------------------------------------- bootstrap

TINY = world.WorldConfig(n_sft=64, n_pref=24, n_ppo=16, n_eval=16, vocab_size=384, dim=32, n_layers=1, n_heads=2,
                         hidden_dim=64, max_seq_len=256, sft_steps=4, sft_batch_size=8, rm_epochs=1, rm_batch_size=8,
                         max_new_tokens=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w") / "seed0")
    lines = []
    paths = world.bootstrap(out, seed=0, cfg=TINY, log=lines.append)
    return out, paths, lines


def test_bootstrap_writes_loadable_files(built):
    out, paths, lines = built
    assert sum(line.startswith("[world] ") for line in lines) == 5, "one progress line per stage"
    tok = llama.Tokenizer(paths["tokenizer"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, 3, 384)
    text = "Reverse: \u00e9\u00e8 ant 42 ZZ"  # unseen characters fall back to bytes, nothing is unknown
    assert tok.decode(tok.encode(text)) == text and 0 not in tok.encode(text)
    policy = checkpoints.load_llama(paths["policy"])
    assert policy.cfg.vocab_size == tok.n_words and policy.cfg.dim == TINY.dim
    assert os.path.exists(os.path.join(paths["policy"], "tokenizer.model"))
    rm = checkpoints.load_reward_model(paths["reward"])
    assert rm.backbone.cfg == policy.cfg
    prompts = json.load(open(paths["prompts"]))
    ev = json.load(open(paths["eval"]))
    pairs = json.load(open(paths["pairs"]))
    assert len(prompts) == TINY.n_ppo and all({"instruction", "input"} <= set(r) for r in prompts)
    assert len(ev) == TINY.n_eval and all("output" in r for r in ev)
    assert len(pairs) == TINY.n_pref and all(p["preference"] in (1, 2) for p in pairs)
    info = json.load(open(paths["info"]))
    assert info["config"]["seed"] == 0 and 0 <= info["sft"]["accuracy"] <= 1
    stats = world.evaluate(policy, tok, ev, reward_model=rm, max_new_tokens=8)
    assert set(stats) == {"win_rate", "win_rate_se", "accuracy", "accuracy_se", "length", "reward"}
    assert 0 <= stats["win_rate"] <= 1 and 1 <= stats["length"] <= 8 and math.isfinite(stats["reward"])
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p], "temporary build directory left"


def test_bootstrap_is_idempotent_and_checks_settings(built):
    out, paths, _ = built
    mtime = os.path.getmtime(paths["info"])
    lines = []
    assert world.bootstrap(out, seed=0, cfg=TINY, log=lines.append) == paths
    assert lines == [] and os.path.getmtime(paths["info"]) == mtime, "second call must be a no-op"
    with pytest.raises(ValueError, match="other settings"):
        world.bootstrap(out, seed=1, cfg=TINY, log=None)


def test_bootstrap_reproducible_from_seed(built, tmp_path):
    _, paths, _ = built
    again = world.bootstrap(str(tmp_path / "again"), seed=0, cfg=TINY, log=None)
    a, b = checkpoints.load_llama(paths["policy"]), checkpoints.load_llama(again["policy"])
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{n} differs between two builds with the same seed"
    for k in ("pairs", "eval", "prompts"):
        assert open(paths[k]).read() == open(again[k]).read()


def test_torchrun_train_end_to_end_on_the_small_world(built, tmp_path):
    """`torchrun train.py --estimator js` with no checkpoints: the (tiny) world in --world-dir, PPO, evaluation
    by the simulated annotator, metrics and a PEFT adapter; cfg=None takes the built world as it is."""
    import subprocess
    import sys
    out, _, _ = built
    assert world.bootstrap(out, seed=0, cfg=None, log=None)["policy"].startswith(out)
    with pytest.raises(ValueError, match="other settings"):
        world.bootstrap(out, seed=1, cfg=None, log=None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(root, "train.py"), "--estimator", "js", "--world-dir", os.path.dirname(out),
           "--out", str(tmp_path / "run"), "--steps", "2", "--rollout-batch-size", "8", "--step-batch-size", "4",
           "--micro-batch-size", "4", "--max-new-tokens", "8", "--eval-every", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics:  # every evaluation has the annotator's win rate and the exact KL to the reference
        assert 0 <= m["eval_win_rate"] <= 1 and 0 <= m["eval_accuracy"] <= 1 and math.isfinite(m["eval_true_kl"])
    assert metrics[0]["eval_true_kl"] == 0.0  # step 0 is the SFT policy itself
    assert all(math.isfinite(m["true_kl"]) and math.isfinite(m["loss"]) for m in metrics[1:])
    policy = checkpoints.load_llama(os.path.join(out, "sft"))
    import lora
    checkpoints.load_adapter(policy, str(tmp_path / "run" / "adapter"))
    assert len(json.load(open(tmp_path / "run" / "eval" / "step0002.json"))) == TINY.n_eval


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("not a world")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "world.py"), "--out", str(tmp_path / "junk")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "holds no world.json" in p.stderr, p.stderr
