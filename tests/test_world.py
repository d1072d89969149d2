"""Tests of the built-in small world: tasks, teacher, the two annotators, and a shrunken, resumable build."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import checkpoints
import llama
from world import build as world
from world import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rec(task, instruction, input=""):
    return {"task": task, "instruction": instruction, "input": input}


# ----------------------------------------------------------------------------- tasks

# hand-written (record, right answer, the teacher's misconception) for every task
GOLDEN = [
    (rec("count", "Count from 8 to 12."), "8 9 10 11 12", "8 9 10 11"),
    (rec("spell", "Spell each word letter by letter.", "egg cat zoo"), "e g g, c a t, z o o", "e g, c a t, z o"),
    (rec("sort", "Sort the words in alphabetical order.", "sun cat sun ant"), "ant, cat, sun, sun", "ant, cat, sun"),
    (rec("add", "Add 47 and 85 step by step."),
     "7 + 5 = 12, write 2 carry 1. 4 + 8 + 1 = 13. So 47 + 85 = 132",
     "7 + 5 = 12, write 2 carry 0. 4 + 8 + 0 = 12. So 47 + 85 = 122"),
]


def test_golden_answers_and_misconceptions():
    assert {r["task"] for r, _, _ in GOLDEN} == set(tasks.TASKS), "a task has no golden example"
    for r, right, wrong in GOLDEN:
        t = tasks.TASKS[r["task"]]
        assert tasks.answer(r) == right, r
        assert t.hard(r["instruction"], r["input"]), f"{r} should be a hard instance"
        assert t.mistake(r["instruction"], r["input"]) == wrong, r
        assert tasks.check(r, right) and tasks.check(r, f"  {right}\n"), "whitespace must not matter"
        assert not tasks.check(r, wrong) and not tasks.check(r, right + " x") and not tasks.check(r, ""), r
    easy = [rec("spell", "Spell each word letter by letter.", "cat dog"), rec("sort", "Sort the words.", "cat dog"),
            rec("add", "Add 41 and 35 step by step.")]
    assert not any(tasks.TASKS[r["task"]].hard(r["instruction"], r["input"]) for r in easy), "nothing to get wrong"


def test_checker_accepts_answers_rejects_errors_on_generated_records():
    rng = random.Random(0)
    s = tasks.make_splits(1, n_sft=0, n_pref=800, n_ppo=0, n_eval=0)["pref"]
    assert {r["task"] for r in s} == set(tasks.TASKS)
    for r in s:
        truth = tasks.answer(r)
        assert tasks.check(r, truth)
        assert not tasks.check(r, tasks.slip(truth, rng)), f"slip of {truth!r} accepted for {r}"
        t = tasks.TASKS[r["task"]]
        if t.hard(r["instruction"], r["input"]):
            assert not tasks.check(r, t.mistake(r["instruction"], r["input"])), r


def test_splits_deterministic_distinct_and_sized():
    a = tasks.make_splits(3, 50, 20, 30, 40)
    assert a == tasks.make_splits(3, 50, 20, 30, 40)
    assert a != tasks.make_splits(4, 50, 20, 30, 40)
    assert [len(a[k]) for k in ("sft", "pref", "ppo", "eval")] == [50, 20, 30, 40]
    key = lambda r: (r["instruction"], r["input"])
    held = {key(r) for r in a["eval"]}
    assert len(held) == len(a["eval"]), "evaluation prompts must be distinct"
    assert not held & {key(r) for k in ("sft", "pref", "ppo") for r in a[k]}, "and held out from training"
    big = tasks.make_splits(0, 6000, 0, 0, 600)
    for k in ("sft", "eval"):  # every split has the same mix of tasks (1/4 each, within 4 standard errors)
        n = len(big[k])
        for t in tasks.TASKS:
            share = sum(r["task"] == t for r in big[k]) / n
            assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), (k, t, share)
    assert all(set(r) == {"instruction", "input", "task", "output"} for r in a["sft"] + a["eval"])
    assert all(set(r) == {"instruction", "input", "task"} for r in a["pref"] + a["ppo"])


def test_teacher_rates():
    s = tasks.make_splits(0, 4000, 0, 0, 0, p_hard=0.6, p_slip=0.05)["sft"]
    hard = [r for r in s if tasks.TASKS[r["task"]].hard(r["instruction"], r["input"])]
    easy = [r for r in s if not tasks.TASKS[r["task"]].hard(r["instruction"], r["input"])]
    for group, p in ((hard, 0.6 + 0.4 * 0.05), (easy, 0.05)):  # hard: the misconception, else a slip
        err = sum(not tasks.check(r, r["output"]) for r in group) / len(group)
        se = math.sqrt(p * (1 - p) / len(group))
        assert abs(err - p) < 4 * se, f"error rate {err:.3f} vs {p} (4 SE = {4 * se:.3f})"
    perfect = tasks.make_splits(0, 500, 0, 0, 0, p_hard=0.0, p_slip=0.0)["sft"]
    assert all(tasks.check(r, r["output"]) for r in perfect)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    s = tasks.make_splits(0, 3000, 0, 0, 0)["sft"]
    texts = [llama.alpaca_prompt(r["instruction"], r["input"]) for r in s] + [r["output"] for r in s]
    return world.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"), 512), s


def test_long_responses_and_short_prompts(tokenizer):
    tok, s = tokenizer
    n = np.array([len(world.encode_pair(tok, r)[1]) for r in s])  # output + EOS, in tokens
    assert n.mean() >= 24 and (n >= 60).mean() >= 0.02, f"mean {n.mean():.1f}, {(n >= 60).mean():.3f} reach 60"
    cfg = world.WorldConfig()
    right = max(len(world.encode_pair(tok, r, tasks.answer(r))[1]) for r in s)
    assert right + 16 <= cfg.max_new_tokens, f"right answers reach {right} tokens: no room to grow past them"
    prompts = [len(world.encode_pair(tok, r)[0]) for r in s]
    assert max(prompts) + cfg.max_new_tokens <= cfg.max_seq_len and np.mean(prompts) < 25, "the template is 5 pieces"
    text = "Reverse: \u00e9\u00e8 ant 42 ZZ"  # unseen characters fall back to bytes, nothing is unknown
    assert tok.decode(tok.encode(text)) == text and 0 not in tok.encode(text)
    p = llama.alpaca_prompt("Count from 3 to 9.")
    assert tok.decode(tok.encode(p)) == p


# ----------------------------------------------------------------------------- annotators

def test_edit_distance():
    assert tasks.edit_distance("kitten", "sitting") == 3
    assert tasks.edit_distance("", "abc") == 3 and tasks.edit_distance("abc", "abc") == 0
    assert tasks.edit_distance("ab", "ba") == 2


R = rec("count", "Count from 8 to 12.")  # truth "8 9 10 11 12"


def test_gold_annotator_rules_and_no_length_preference():
    prefer = tasks.prefer
    assert prefer(R, "8 9 10 11 12", "8 9 10 11") == 1.0  # correct beats incorrect, shorter ...
    assert prefer(R, "8 9 10 11 12", "8 9 10 11 12 13 14") == 1.0  # ... and longer
    assert prefer(R, "8 9 10 11", "8 9 10 11 12") == 0.0
    assert prefer(R, "8 9 10 11", "8 9") == 1.0  # both wrong: the closer one (edit distance 3 vs 9) ...
    assert prefer(R, "8 9 10 11 12 13", "8 9 10 11 12 13 14 15") == 1.0  # ... whether shorter or longer
    assert prefer(R, "8 9 10 11 12 13", "8 9 10 11") == 0.5  # equal distance (3): a tie, longer or shorter
    assert prefer(R, "8 9 10 11 12", " 8  9 10 11 12\n") == 0.5  # identical up to whitespace
    rng = random.Random(0)
    for _ in range(200):  # symmetric: swapping the responses flips the verdict
        a, b = (tasks.slip(tasks.answer(R), rng) if rng.random() < 0.7 else tasks.answer(R) for _ in range(2))
        assert prefer(R, a, b) == 1.0 - prefer(R, b, a)


def test_training_annotator_bias_exactly():
    right, long_wrong, short_wrong = "8 9 10 11 12", "8 9 10 11 12 13 14", "8 9 10"
    biased = tasks.prefer_biased
    for u in (0.0, 0.29):  # u < length_bias: the longer response wins, right or wrong
        assert biased(R, right, long_wrong, u, 0.3) == 0.0 and biased(R, long_wrong, right, u, 0.3) == 1.0
        assert biased(R, right, short_wrong, u, 0.3) == 1.0
        assert biased(R, "8 9 10 11 13", right, u, 0.3) == 0.0  # equal lengths: the gold judgment
    for u in (0.3, 0.99):  # otherwise the gold judgment
        assert biased(R, right, long_wrong, u, 0.3) == 1.0 and biased(R, long_wrong, right, u, 0.3) == 0.0
    assert all(biased(R, right, long_wrong, u / 10, 0.0) == 1.0 for u in range(10)), "length_bias 0 = gold"


def test_label_rates_within_standard_errors():
    n = 4000
    right, long_wrong = "8 9 10 11 12", "8 9 10 11 12 13 14"
    for bias, noise in ((0.0, 0.0), (0.3, 0.0), (0.0, 0.2), (0.3, 0.25)):
        labels = tasks.label_pairs([R] * n, [right] * n, [long_wrong] * n, bias, noise, seed=0)
        p = bias * (1 - noise) + (1 - bias) * noise  # the longer, wrong response is labelled preferred
        got = sum(lab == 2 for lab in labels) / n
        assert abs(got - p) <= 4 * math.sqrt(p * (1 - p) / n), f"bias {bias} noise {noise}: {got:.4f} vs {p}"
    ties = tasks.label_pairs([R] * n, ["8 9"] * n, ["8 9"] * n, 0.3, 0.2, seed=0)
    first = sum(lab == 1 for lab in ties) / n
    assert abs(first - 0.5) < 4 * math.sqrt(0.25 / n), f"a tie must be a fair coin, got {first:.4f}"
    s = tasks.make_splits(0, 0, 300, 0, 0)["pref"]
    a = [tasks.answer(r) for r in s]
    b = [tasks.slip(x, random.Random(i)) for i, x in enumerate(a)]
    assert tasks.label_pairs(s, a, b, 0.3, 0.25, seed=5) == tasks.label_pairs(s, a, b, 0.3, 0.25, seed=5)
    assert tasks.label_pairs(s, a, b, 0.3, 0.25, seed=5) != tasks.label_pairs(s, a, b, 0.3, 0.25, seed=6)
    assert tasks.label_pairs(s, a, b, 0.0, 0.0) == [1] * len(s), "no bias, no noise: the gold annotator"


def test_win_rate_and_mean_se_match_float64():
    s = tasks.make_splits(2, 0, 0, 0, 200)["eval"]
    rng = random.Random(0)
    outs = [tasks.answer(r) if rng.random() < 0.6 else tasks.slip(tasks.answer(r), rng) for r in s]
    refs = [r["output"] for r in s]
    mean, se = tasks.win_rate(s, outs, refs)
    v = np.array([tasks.prefer(r, o, y) for r, o, y in zip(s, outs, refs)], dtype=np.float64)
    assert mean == pytest.approx(v.mean(), abs=1e-12) and se == pytest.approx(v.std(ddof=1) / math.sqrt(len(v)), abs=1e-12)
    right = [tasks.answer(r) for r in s]
    assert tasks.win_rate(s, right, right) == (0.5, 0.0)  # identical outputs: all ties
    assert tasks.win_rate(s, right, [tasks.slip(t, rng) for t in right]) == (1.0, 0.0)
    assert tasks.mean_se([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt((16 / 9 + 1 / 9 + 25 / 9) / 2 / 3)))
    assert math.isnan(tasks.mean_se([3.0])[1])



def test_judge_prints_the_win_rates_of_hand_written_outputs(tmp_path, capsys):
    """python -m world.judge A --against B --world W on four count prompts whose verdicts are known by the gold rules
    (right beats wrong; else the closer to the right answer; else a tie). Against the references, A wins
    1, 1/2, 1, 0 and B wins 1/2, 0, 1/2, 0: A 62.5% with SE sqrt(0.6875 / 3 / 4) = 23.9; A - B per prompt
    1/2, 1/2, 1/2, 0: +37.5 with SE sqrt(0.1875 / 3 / 4) = 12.5 points."""
    prompts = [("Count from 1 to 5.", "1 2 3 4"), ("Count from 3 to 6.", "3 4 5 6"),     # (instruction, reference):
               ("Count from 10 to 13.", "10 11 12"), ("Count from 7 to 9.", "7 8 9")]     # wrong, right, wrong, right
    a = ["1 2 3 4 5", "3 4 5 6", "10 11 12 13", "7 8"]      # right, right (a tie), right, wrong
    b = ["1 2 3 4", "3 4 5", "10 11 12", "7 8"]             # as the reference (ties), wrong, a tie, wrong
    os.makedirs(tmp_path / "w" / "data")
    with open(tmp_path / "w" / world.LAYOUT["eval"], "w") as f:
        json.dump([{**rec("count", i), "output": ref} for i, ref in prompts], f)
    for name, outs in (("a.json", a), ("b.json", b)):   # AlpacaEval records, as train.py writes OUT/eval/stepNNNN.json
        with open(tmp_path / name, "w") as f:
            json.dump([{"instruction": i, "input": "", "output": o, "generator": name}
                       for (i, _), o in zip(prompts, outs)], f)
    judge = lambda *args: subprocess.run([sys.executable, "-m", "world.judge", *args, "--world", str(tmp_path / "w")],
                                         capture_output=True, text=True, cwd=ROOT)
    p = judge(str(tmp_path / "a.json"), "--against", str(tmp_path / "b.json"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        f"{tmp_path / 'a.json'}: gold win rate 62.5% ± 23.9 against the reference outputs (4 prompts)",
        f"against {tmp_path / 'b.json'}: +37.5 ± 12.5 points, paired by prompt"]
    # outputs for other prompts, or in another order, are refused in one line
    with open(tmp_path / "c.json", "w") as f:
        json.dump([{"instruction": i, "input": "", "output": o} for (i, _), o in zip(prompts[::-1], a)], f)
    from world import judge as judge_module  # in this process: the command line is tested above
    assert judge_module.main([str(tmp_path / "c.json"), "--world", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "c.json does not hold outputs for the prompts of" in err, err


# ----------------------------------------------------------------------------- the build

TINY = world.WorldConfig(n_sft=64, n_pref=24, n_ppo=16, n_eval=16, vocab_size=384, dim=32, n_layers=1, n_heads=2,
                         hidden_dim=64, max_seq_len=256, sft_steps=4, sft_batch_size=8, rm_epochs=1, rm_batch_size=8,
                         max_new_tokens=8)


def files(d):
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            out[os.path.relpath(os.path.join(root, n), d)] = open(os.path.join(root, n), "rb").read()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w") / "seed0")
    lines = []
    paths = world.bootstrap(out, seed=0, cfg=TINY, log=lines.append)
    return out, paths, lines


def test_bootstrap_writes_loadable_files_and_says_what_it_does(built):
    out, paths, lines = built
    assert lines[0].startswith(f"[world] building the small world into {out}: once")
    stages = [line for line in lines if line.startswith("[world] ") and "/5 " in line]
    assert [line.split()[1] for line in stages] == ["1/5", "2/5", "3/5", "4/5", "5/5"], lines
    assert all(line.endswith(" in all)") for line in stages), "every stage says its time"
    tok = llama.Tokenizer(paths["tokenizer"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, 3, 384)
    policy = checkpoints.load_llama(paths["policy"])
    assert policy.cfg.vocab_size == tok.n_words and policy.cfg.dim == TINY.dim
    assert os.path.exists(os.path.join(paths["policy"], "tokenizer.model"))
    rm = checkpoints.load_reward_model(paths["reward"])
    assert rm.backbone.cfg == policy.cfg
    prompts, ev, pairs = (json.load(open(paths[k])) for k in ("prompts", "eval", "pairs"))
    assert len(prompts) == TINY.n_ppo and all({"instruction", "input"} <= set(r) for r in prompts)
    assert len(ev) == TINY.n_eval and all("output" in r for r in ev)
    assert len(pairs) == TINY.n_pref and all(p["preference"] in (1, 2) for p in pairs)
    info = world.read_world(paths["info"])
    assert info["config"] == {"seed": 0, **world.asdict(TINY)} and set(info) == {"config"} | {s for s, _ in world.STAGES}
    sft = info["sft"]  # the SFT policy's greedy responses, judged by the gold annotator
    assert set(sft) == {"parameters", "win_rate", "win_rate_se", "accuracy", "accuracy_se", "length"}
    assert 1 <= sft["length"] <= TINY.max_new_tokens and sft["parameters"] == sum(p.numel() for p in policy.parameters())
    assert sorted(os.listdir(os.path.dirname(out))) == ["seed0"], "a temporary build directory was left"
    assert not [f for f in files(out) if f.startswith(".done") or f == "spec.json"], "build markers left"


def test_bootstrap_is_idempotent_and_checks_settings(built):
    out, paths, _ = built
    mtime = os.path.getmtime(paths["info"])
    lines = []
    assert world.bootstrap(out, seed=0, cfg=TINY, log=lines.append) == paths
    assert world.bootstrap(out, seed=0, cfg=None, log=lines.append) == paths  # as built
    assert lines == [] and os.path.getmtime(paths["info"]) == mtime, "a second call must be a no-op"
    with pytest.raises(ValueError, match="other settings"):
        world.bootstrap(out, seed=1, cfg=TINY, log=None)


@pytest.mark.slow
def test_two_processes_build_byte_identical_worlds(built, tmp_path):
    """Every file of a world built in another process equals this process's build, byte for byte."""
    code = (f"from world import build as world; world.bootstrap({str(tmp_path / 'seed0')!r}, 0, world.{TINY!r}, log=None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = files(built[0]), files(str(tmp_path / "seed0"))
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []


def test_interrupted_build_resumes_from_its_last_stage(built, tmp_path, monkeypatch):
    out = str(tmp_path / "seed0")

    def boom(*args):
        raise KeyboardInterrupt("stopped during stage 3")

    stages = list(world.STAGES)
    monkeypatch.setattr(world, "STAGES", stages[:2] + [("sft", boom)] + stages[3:])
    with pytest.raises(KeyboardInterrupt):
        world.bootstrap(out, 0, TINY, log=None)
    monkeypatch.setattr(world, "STAGES", stages)
    (left,) = [d for d in os.listdir(tmp_path) if ".tmp-" in d]  # stages 1-2 are kept for the next call
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(tmp_path / left, tmp_path / f"seed0.tmp-{int(dead.stdout)}")  # as if left by a killed process
    lines = []
    world.bootstrap(out, 0, TINY, log=lines.append)
    assert any("resuming the build left in" in line and "2 of 5 stages finished" in line for line in lines), lines
    stages = [line for line in lines if line.startswith("[world] ") and "/5 " in line]
    assert stages[:2] == ["[world] 1/5 splits: finished by the earlier build",
                          "[world] 2/5 tokenizer: finished by the earlier build"], "stages 1-2 must be reused"
    assert [line.split()[1] for line in stages[2:]] == ["3/5", "4/5", "5/5"]
    a, b = files(built[0]), files(out)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == [], "resumed != uninterrupted"
    assert sorted(os.listdir(tmp_path)) == ["seed0"]


def test_stale_build_with_other_settings_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"seed0.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "spec.json").write_text(json.dumps({"seed": 5}))
    (stale / ".done-splits.json").write_text("{}")
    lines = []
    d = world.claim_build_dir(str(tmp_path / "seed0"), {"seed": 0}, lines.append)
    assert not stale.exists() and lines == [f"[world] removed {stale}, left by an interrupted build"]
    assert os.path.basename(d) == f"seed0.tmp-{os.getpid()}" and os.listdir(d) == ["spec.json"]


def test_damaged_world_is_one_line(tmp_path):
    d = tmp_path / "seed0"
    d.mkdir()
    (d / "world.json").write_text('{"config": {"seed": 0, ')  # cut off
    with pytest.raises(ValueError, match=f"{d / 'world.json'} is not a world description"):
        world.bootstrap(str(d), 0, None, log=None)
    p = subprocess.run([sys.executable, "-m", "world.build", "--out", str(d)], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "world.json is not a world description" in p.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("not a world")
    with pytest.raises(ValueError, match="holds no world.json"):
        world.bootstrap(str(tmp_path / "junk"), 0, TINY, log=None)


@pytest.mark.slow
def test_torchrun_train_end_to_end_on_the_small_world(built, tmp_path):
    """`torchrun train.py --estimator js` with no checkpoints: the (tiny) world in --world-dir, PPO, evaluation
    by the gold annotator, metrics and a PEFT adapter; cfg=None takes the built world as it is."""
    out, _, _ = built
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "train.py"), "--estimator", "js", "--world-dir", os.path.dirname(out),
           "--out", str(tmp_path / "run"), "--steps", "2", "--rollout-batch-size", "8", "--step-batch-size", "4",
           "--micro-batch-size", "4", "--max-new-tokens", "8", "--eval-every", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics:  # every evaluation has the annotator's win rate and the exact KL to the reference
        assert 0 <= m["eval_win_rate"] <= 1 and 0 <= m["eval_accuracy"] <= 1 and math.isfinite(m["eval_true_kl"])
    assert metrics[0]["eval_true_kl"] == 0.0  # step 0 is the SFT policy itself
    assert all(math.isfinite(m["true_kl"]) and math.isfinite(m["loss"]) for m in metrics[1:])
    policy = checkpoints.load_llama(os.path.join(out, "sft"))
    checkpoints.load_adapter(policy, str(tmp_path / "run" / "adapter"))
    assert len(json.load(open(tmp_path / "run" / "eval" / "step0002.json"))) == TINY.n_eval
