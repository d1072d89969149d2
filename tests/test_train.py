"""train.py: two-rank torchrun on CPU (gloo), exact resume, --dry-run for LLaMA-7B, and bad input."""
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import divergences
import llama
import lora
from reward import RewardModel
from support import config, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=96, max_seq_len=256)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SFT checkpoint with its tokenizer, a tiny reward model and a prompts file."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("train")
    words = "red blue green cat dog sun moon sort count copy reverse the words".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (6,), generator=g)) for _ in range(200)]
    (d / "text.txt").write_text("\n".join(lines + [llama.alpaca_prompt("x", "y")]))
    (d / "policy").mkdir()
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "policy" / "tokenizer"),
                                   vocab_size=CFG.vocab_size, model_type="bpe", byte_fallback=True, minloglevel=2)
    torch.manual_seed(0)
    checkpoints.save_llama(llama.Llama(CFG), str(d / "policy"))
    torch.manual_seed(1)
    checkpoints.save_reward_model(RewardModel(CFG), str(d / "reward"))
    records = [{"instruction": f"Sort the words: {l}", "input": ""} for l in lines[:40]]
    (d / "prompts.json").write_text(json.dumps(records))
    return d


def base_args(d, out, *extra):
    return ["--policy", str(d / "policy"), "--reward", str(d / "reward"), "--prompts", str(d / "prompts.json"),
            "--out", str(out), "--rollout-batch-size", "8", "--step-batch-size", "4", "--micro-batch-size", "2",
            "--max-new-tokens", "6", "--steps", "3", "--save-every", "1", "--lr", "1e-3", "--estimator", "js",
            *extra]


def run(args, torchrun=False, nproc=1):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
           if torchrun else [sys.executable]) + [os.path.join(ROOT, "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


DETERMINISTIC = ("score", "penalty", "true_kl", "response_length", "loss", "pg_loss", "vf_loss", "grad_norm")


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """A 4-step run, start to end: what every interrupted-and-resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("full") / "o"
    r = run(base_args(setup, out, "--steps", "4"))
    assert r.returncode == 0, r.stderr
    return out


def assert_same_run(a, b):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [m["step"] for m in ma] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        for k in DETERMINISTIC:
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    from safetensors.torch import load_file
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(setup, uninterrupted, tmp_path):
    part = tmp_path / "part"
    # the same run, killed (SIGKILL) as soon as its first checkpoint is published, then resumed; the killed run
    # uses torch's default thread count, the others one thread: pinned, the digits depend on neither
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *base_args(setup, part, "--steps", "4")],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = part / "checkpoint" / "state.pt"
    while not state.exists() and p.poll() is None:
        time.sleep(0.02)
    p.kill()
    p.wait()
    killed_at = torch.load(state, weights_only=True)["step"]
    r = run(base_args(setup, part, "--steps", "4", "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {part}/checkpoint at step {killed_at}" in r.stdout
    assert f"took over {part}/.lock from PID {p.pid}, which is no longer running" in r.stdout
    assert_same_run(uninterrupted, part)
    for m in metrics(uninterrupted):  # the timings are logged: generation and scoring are parts of the rollout
        assert min(m[k] for k in ("time_generate", "time_score", "time_train", "tokens_per_s")) > 0, m
        assert m["time_generate"] + m["time_score"] <= m["time_rollout"], m


def test_files_get_the_usual_permissions(uninterrupted):
    umask = os.umask(0)
    os.umask(umask)
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "checkpoint/state.pt",
              "checkpoint/policy_adapter/adapter_model.safetensors", "metrics.jsonl"):
        assert stat.S_IMODE(os.stat(uninterrupted / f).st_mode) == 0o666 & ~umask, f


def wait_for_step(out, step, p, timeout=120):
    t = time.time()
    while time.time() - t < timeout and p.poll() is None:
        if (out / "metrics.jsonl").exists() and any(f'"step": {step},' in l for l in open(out / "metrics.jsonl")):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_ctrl_c_saves_the_last_step_and_resume_is_exact(setup, uninterrupted, tmp_path, launcher):
    part = tmp_path / "part"
    cmd = ([sys.executable] if launcher == "python" else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"])
    # no periodic checkpoint: whatever is saved, Ctrl-C saved it
    p = subprocess.Popen(cmd + [os.path.join(ROOT, "train.py"), *base_args(setup, part, "--steps", "4",
                                                                           "--save-every", "100")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    wait_for_step(part, 2, p)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground process group
    _, err = p.communicate(timeout=60)
    assert p.returncode == (130 if launcher == "python" else 1), err
    step = torch.load(part / "checkpoint" / "state.pt", weights_only=True)["step"]
    line = f"interrupted (SIGINT): the checkpoint of step {step} is in {part}/checkpoint (--resume continues from it)"
    ours = [l for l in err.splitlines() if not l.startswith(("W", "I", " ", "Traceback", "torch."))]
    # step >= 1: only Ctrl-C can have saved it (--save-every 100). Not >= 2: a step's metrics line is written before
    # the step becomes the last finished one, so Ctrl-C just after step 2's line may save step 1 (resume redoes 2)
    assert step >= 1 and ours == [line], err  # (torchrun adds its own report of the signal)
    r = run(base_args(setup, part, "--steps", "4", "--resume"))
    assert r.returncode == 0, r.stderr
    assert_same_run(uninterrupted, part)


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused(setup, tmp_path):
    out = tmp_path / "o"
    a = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *base_args(setup, out, "--steps", "50")],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(out, 1, a)
    before = (out / "metrics.jsonl").read_text()
    r = run(base_args(setup, out, "--steps", "1"))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: --out {out} is in use by another run (PID {a.pid}, {out}/.lock); wait for it to finish or choose "
        f"another --out"), r.stderr
    assert (out / "metrics.jsonl").read_text().startswith(before) and not (out / "previous-1").exists()
    a.kill()
    a.wait()


@pytest.mark.slow
def test_a_worker_stops_when_its_launcher_dies(setup, tmp_path):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          os.path.join(ROOT, "train.py"), *base_args(setup, out, "--steps", "50", "--save-every", "100")],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_step(out, 2, p)  # (step 1 is then the last finished step: its metrics line precedes its snapshot)
    worker = int((out / ".lock").read_text())  # rank 0 holds OUT's lock
    assert worker != p.pid
    p.kill()  # kill -9 of torchrun: it forwards nothing
    p.wait()
    t = time.time()
    while os.path.exists(f"/proc/{worker}") and time.time() - t < 60:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}"), "the worker outlived its launcher"
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] >= 1  # and saved on the way out


def test_lora_targets_set_the_fraction_that_trains(setup, tmp_path, capsys):
    """--lora-targets w2,wq,w1: LoRA on those projections of every layer, policy and value model; the count
    printed equals rank x (in + out) summed over them (an independent count from the config), the adapter
    lists their PEFT names and loads back into the SFT model with exactly those layers. The order given does
    not matter: w1,wq,w2 is the same run, bit for bit."""
    import train
    cfg, r = CFG, 4
    per_layer = r * ((cfg.dim + cfg.dim) + (cfg.dim + cfg.hidden_dim) + (cfg.hidden_dim + cfg.dim))  # wq, w1, w2
    n_sft = sum(p.numel() for p in checkpoints.load_llama(str(setup / "policy")).parameters())
    assert train.cli(base_args(setup, tmp_path / "o", "--steps", "1", "--lora-rank", str(r),
                               "--lora-targets", "w2,wq,w1")) == 0
    n = cfg.n_layers * per_layer
    assert f"(policy LoRA on wq,w1,w2 {n:,} = {100 * n / n_sft:.2f}% of the SFT model's {n_sft:,}; value LoRA + " \
           f"head {n + cfg.dim + 1:,})" in capsys.readouterr().out
    adapter = str(tmp_path / "o" / "adapter")
    assert json.load(open(os.path.join(adapter, "adapter_config.json")))["target_modules"] == \
        ["down_proj", "gate_proj", "q_proj"]
    model = checkpoints.load_llama(str(setup / "policy"))
    checkpoints.load_adapter(model, adapter)
    assert sorted((i, t) for i, t, _ in lora.lora_layers(model)) == sorted(
        (i, t) for i in range(cfg.n_layers) for t in ("wq", "w1", "w2"))
    assert train.cli(base_args(setup, tmp_path / "b", "--steps", "1", "--lora-rank", str(r),
                               "--lora-targets", "w1,wq,w2")) == 0
    read = lambda d: open(os.path.join(d, "adapter_model.safetensors"), "rb").read()
    assert read(adapter) == read(tmp_path / "b" / "adapter")


def test_full_fine_tuning(setup, tmp_path, capsys):
    """--finetune full: at lr 1e-30 (0 is refused) the policy written to OUT/policy is the SFT model bit for bit; one step at lr 1e-3
    moves every weight tensor of the policy and of the value model (whose backbone starts as the reward model's);
    a run stopped after step 1 and resumed ends as the uninterrupted 2-step run, metrics and weights equal; and
    OUT/policy is a checkpoint sample.py reads."""
    import sample
    import train
    sft = checkpoints.load_llama(str(setup / "policy")).state_dict()
    weights = lambda out: checkpoints.load_llama(str(out / "policy")).state_dict()
    assert train.cli(base_args(setup, tmp_path / "lr0", "--finetune", "full", "--lr", "1e-30", "--steps", "1")) == 0
    assert "trainable: " in capsys.readouterr().out
    assert all(torch.equal(v, sft[k]) for k, v in weights(tmp_path / "lr0").items())
    assert train.cli(base_args(setup, tmp_path / "a", "--finetune", "full", "--steps", "2")) == 0
    assert train.cli(base_args(setup, tmp_path / "b", "--finetune", "full", "--steps", "1")) == 0
    one = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=True)["trainable"]
    rm = checkpoints.load_reward_model(str(setup / "reward")).backbone.state_dict()
    rm.pop("output.weight")  # the value model reads hidden states: its LM head does not train
    assert set(one) == {f"policy.{k}" for k in sft} | {f"value.backbone.{k}" for k in rm} | {
        "value.value_head.weight", "value.value_head.bias"}
    moved = [k for k in sft if not torch.equal(one[f"policy.{k}"], sft[k])] + [
        k for k in rm if not torch.equal(one[f"value.backbone.{k}"], rm[k])]
    assert len(moved) == len(sft) + len(rm), set(sft) - set(moved)
    assert train.cli(base_args(setup, tmp_path / "b", "--finetune", "full", "--steps", "2", "--resume")) == 0
    assert [{k: m[k] for k in DETERMINISTIC} for m in metrics(tmp_path / "a")] == \
        [{k: m[k] for k in DETERMINISTIC} for m in metrics(tmp_path / "b")]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert sample.cli(["--checkpoint", str(tmp_path / "a" / "policy"), "--prompt", "Sort the words: cat dog",
                       "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert "### Sort the words: cat dog" in capsys.readouterr().out


def test_a_failed_run_leaves_no_lock_and_no_directory_it_made(setup, tmp_path, capsys):
    import train
    """A run that fails after claiming OUT (here: a prompts file that does not exist) removes OUT/.lock, and OUT
    itself when it made it and wrote nothing; an OUT that held the user's files keeps them, without a .lock."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (tmp_path / "new" / "o", kept):
        code = train.cli(base_args(setup, out, "--prompts", str(tmp_path / "missing")))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and str(tmp_path / "missing") in err[0], err
    assert not (tmp_path / "new" / "o").exists() and (tmp_path / "new").is_dir()  # only what the run made
    assert os.listdir(kept) == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"


def test_a_full_disk_names_the_file_and_leaves_no_part_of_it(tmp_path):
    """Every file the project writes goes through support/files.py: a write that fails for lack of room (here a
    file-size limit, which fails the write as a full disk does) is one line naming the file, for JSON, safetensors
    and a PEFT adapter; the earlier file is unchanged and no temporary file is left beside it. Controls: the same
    writes succeed without the limit (in this process)."""
    targets = {"json": tmp_path / "j" / "f.json", "safetensors": tmp_path / "s" / "f.safetensors",
               "adapter": tmp_path / "a" / "adapter_model.safetensors"}
    writes = {"json": "files.write_json({!r}, list(range(2000)))",
              "safetensors": "files.save_safetensors({!r}, {{'w': torch.zeros(2000)}})",
              "adapter": "m = llama.Llama(llama.PRESETS['tiny']); lora.add_lora(m); checkpoints.save_adapter(m, {!r})"}
    paths = {k: str(t.parent if k == "adapter" else t) for k, t in targets.items()}
    code = ("import resource, signal, sys, torch; sys.path.insert(0, sys.argv[1])\n"
            "import checkpoints, llama, lora\nfrom support import files\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nresource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))\n"
            + "".join(f"try:\n    {writes[k].format(paths[k])}\nexcept OSError as e:\n    print(e)\n" for k in writes))
    for t in targets.values():
        t.parent.mkdir()
        t.write_bytes(b"earlier")
    r = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, (r.stdout, r.stderr)
    for line, t in zip(lines, targets.values()):
        assert line.startswith(f"could not write {t} (") and line.endswith(f"any earlier {t.name} is unchanged"), line
        assert t.read_bytes() == b"earlier" and os.listdir(t.parent) == [t.name]
    import lora
    from support import files
    files.write_json(str(targets["json"]), list(range(2000)))
    files.save_safetensors(str(targets["safetensors"]), {"w": torch.zeros(2000)})
    m = llama.Llama(llama.PRESETS["tiny"])
    lora.add_lora(m)
    checkpoints.save_adapter(m, paths["adapter"])
    assert all(t.stat().st_size > 4000 for t in targets.values())


@pytest.mark.slow
def test_a_full_disk_leaves_the_previous_checkpoint_whole(setup, tmp_path):
    out = tmp_path / "o"
    assert run(base_args(setup, out, "--steps", "1")).returncode == 0
    state = (out / "checkpoint" / "state.pt").read_bytes()
    limit = len(state) - 1  # every file may grow to this size: the next state.pt cannot be written

    def small_files():  # EFBIG at the limit, the way ENOSPC fails a write, instead of SIGXFSZ killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *base_args(setup, out, "--steps", "2",
                                                                                   "--resume")],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: could not write the checkpoint of step 2 to {out}/checkpoint.tmp") and \
        r.stderr.strip().endswith(f"{out}/checkpoint is unchanged"), r.stderr
    assert (out / "checkpoint" / "state.pt").read_bytes() == state and not (out / "checkpoint.tmp").exists()


@pytest.mark.slow
def test_a_full_disk_while_writing_an_eval_file_names_it(setup, tmp_path):
    out = tmp_path / "o"

    def small_files():  # every file may grow to 1000 bytes: step 0's evaluation file cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                        *base_args(setup, out, "--eval-prompts", str(setup / "prompts.json"))],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert r.returncode == 1 and r.stderr == f"error: could not write {out}/eval/step0000.json (File too large); any " \
                                             "earlier step0000.json is unchanged\n", r.stderr
    assert os.listdir(out / "eval") == [], "no partial file is left"


@pytest.mark.slow
def test_activation_checkpointing_changes_no_number(setup, tmp_path):
    """--activation-checkpointing recomputes each block in backward with the dropout masks of the forward, so a
    run gives exactly the metrics and adapter of the run without it (on the CPU the default is off)."""
    runs = {}
    for flag in ("--no-activation-checkpointing", "--activation-checkpointing"):
        r = run(base_args(setup, tmp_path / flag, "--steps", "2", flag))
        assert r.returncode == 0, r.stderr
        assert f"activation checkpointing {'off' if 'no' in flag else 'on'}" in r.stdout
        runs[flag] = r.stdout
    a, b = (metrics(tmp_path / f) for f in runs)
    assert [{k: m[k] for k in DETERMINISTIC} for m in a] == [{k: m[k] for k in DETERMINISTIC} for m in b]
    checksum = lambda out: re.search(r"trainable checksum (\S+)", out).group(1)
    assert checksum(runs["--no-activation-checkpointing"]) == checksum(runs["--activation-checkpointing"])


@pytest.mark.slow
def test_a_new_run_never_overwrites_an_earlier_one(setup, tmp_path):
    out = tmp_path / "o"
    for i in (1, 2, 3):  # the same command three times into the same OUT
        r = run(base_args(setup, out, "--steps", "1", "--seed", str(i)))
        assert r.returncode == 0, r.stderr
    run_files = ["adapter", "checkpoint", "metrics.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == run_files + ["previous-1", "previous-2"]  # no .lock: ended
    for prev, seed in ((out / "previous-1", 1), (out / "previous-2", 2), (out, 3)):  # each run's files, whole
        assert sorted(p.name for p in prev.iterdir() if "previous" not in p.name and p.name != ".lock") == run_files
        assert torch.load(prev / "checkpoint" / "state.pt", weights_only=True)["args"]["seed"] == seed
        assert [m["step"] for m in metrics(prev)] == [1]
    assert f"to {out}/previous-2 (`--out {out}/previous-2 --resume` would continue it)" in r.stdout


@pytest.mark.slow
def test_two_ranks_keep_identical_weights(setup, tmp_path):
    out = tmp_path / "ddp"
    r = run(base_args(setup, out, "--steps", "2"), torchrun=True, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    rng = [torch.load(out / "checkpoint" / f"rng-rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert not torch.equal(rng[0]["gen_rng"], rng[1]["gen_rng"])  # the ranks sampled different rollouts
    # each rank reports its own trainable weights' checksum in the log: they must agree
    # (the two processes share one stdout, so a line may be interleaved with the other rank's)
    sums = dict((rank, s) for s, rank in re.findall(r"trainable checksum (\S+) \(rank (\d+)\)", r.stdout))
    assert sorted(sums) == ["0", "1"] and len(set(sums.values())) == 1, r.stdout
    assert len(metrics(out)) == 2 and state["step"] == 2


def test_dry_run_7b(capsys):
    import train
    assert train.cli(["--preset", "llama-7b", "--dry-run"]) == 0  # in this process: nothing is allocated
    r = SimpleNamespace(stdout=capsys.readouterr().out)
    assert ("trainable: policy LoRA 8,388,608 + value LoRA 8,388,608 + value head 4,097 = 16,781,313\n"
            "           0.249% of the 6,738,415,616 parameters") in r.stdout
    lines = r.stdout.splitlines()
    row = lambda prefix: next(l for l in lines if l.startswith(prefix)).split()
    # bf16 weights: policy + value on the first GPU, reference + reward model (+ its 4097-parameter head) on the
    # second (both keep the unused LM head, as AlpacaFarm's files do); trainable: fp32 weight, grad, 2 Adam moments
    assert row("two-device")[-2:] == [f"{2 * 6_738_415_616 * 2 / 2**30:.2f}", f"{16_781_313 * 16 / 2**30:.2f}"]
    assert row("             cuda:1")[-1] == f"{(2 * 6_738_415_616 + 4097) * 2 / 2**30:.2f}"
    # one device: both base models once (the reference is the policy, the reward model the value backbone), plus
    # the reward head (4096 + 1)
    assert row("one-device")[-2:] == [f"{(2 * 6_738_415_616 + 4097) * 2 / 2**30:.2f}", f"{16_781_313 * 16 / 2**30:.2f}"]
    assert "one-device" in r.stdout and "two-device" in r.stdout
    # the peak table: micro-batches 8, 16, 32 with and without checkpointing; with it, a layer keeps one
    # input per token, so at the paper's 16 the update falls below generation, whose peak is the weights,
    # Adam's state and the KV cache: 2 (k, v) x 32 layers x 64 sequences x 492 tokens x 4096 x 2 bytes,
    # plus one block of the 64 x 192-token prompt (2 x 4096 + 3 x 11008 values of 2 bytes per token)
    table = {(int(r[2]), r[3]): [float(x) for x in r[4:]] for r in map(str.split, lines)
             if r[:2] == ["one-device", "cuda:0"] and len(r) == 8}
    assert sorted(table) == [(m, c) for m in (8, 16, 32) for c in ("off", "on")]
    generate, score, update, peak = table[16, "on"]
    weights = (2 * 6_738_415_616 + 4097) * 2 + 16_781_313 * 16
    kv, prompt = 2 * 32 * 64 * 492 * 4096 * 2, 64 * 192 * (2 * 4096 + 3 * 11008) * 2
    assert update < generate and peak == round((weights + kv + prompt) / 2**30, 2) <= 44
    assert table[16, "off"][2] > 10 * update and table[16, "off"][3] > 80


def test_dry_run_7b_full_fine_tuning(capsys):
    """--finetune full at 7B: every weight of policy and value model trains in fp32 (16 bytes each with gradient
    and Adam's moments; the value model's LM head is frozen), the reference is a bf16 copy beside the reward model,
    and the plan says that state alone needs three 80 GB GPUs: why the paper's full fine-tuning took eight."""
    import train
    assert train.cli(["--preset", "llama-7b", "--dry-run", "--finetune", "full"]) == 0
    out = capsys.readouterr().out
    sft, head = 6_738_415_616, 32000 * 4096
    trainable = sft + (sft - head) + 4097
    assert (f"trainable: policy {sft:,} + value model {sft - head:,} + value head 4,097 = {trainable:,}\n"
            "           every weight, in fp32") in out
    row = lambda prefix: next(l for l in out.splitlines() if l.startswith(prefix)).split()
    assert row("two-device")[-2:] == [f"{head * 4 / 2**30:.2f}", f"{trainable * 16 / 2**30:.2f}"]
    assert row("             cuda:1")[-1] == f"{(2 * sft + 4097) * 2 / 2**30:.2f}"
    assert row("one-device")[-2:] == [f"{(head * 4 + (2 * sft + 4097) * 2) / 2**30:.2f}",
                                      f"{trainable * 16 / 2**30:.2f}"]
    assert f"({trainable * 16 / 2**30:.2f} GiB: fp32 weights, gradients and Adam's moments) needs 3 GPUs of 80 GB" in out
    # the automatic activation checkpointing decides on the same figure the plan prints (micro-batch 16)
    from support import plan
    args = dataclasses.replace(train.Args(), preset="llama-7b", dry_run=True, finetune="full")
    peaks = {r.split()[3]: r.split()[-1] for r in out.splitlines() if r.startswith("one-device   cuda:0") and
             r.split()[2] == "16"}
    assert peaks == {c: f"{plan.training_device_peak(args, c == 'on') / 2**30:.2f}" for c in ("off", "on")}, peaks


def test_dry_run_activation_estimate_against_autograd():
    """plan.saved_bytes_per_token_layer against the bytes autograd really keeps (saved_tensors_hooks, storages
    counted once, parameters excluded), per layer: the difference between a 2- and a 1-layer LoRA model. On the
    CPU dropout keeps its mask in the input dtype, not 1 byte, and the formula leaves out small terms, so the
    measurement may exceed it, by at most 20% here; dropping a term (SwiGLU is ~40% of it) or double counting
    fails. With activation checkpointing a block keeps exactly its input (the
    checkpoint saves it through the same hooks; what the block saved inside is recomputed in backward)."""
    import lora
    from support import plan

    def saved(n_layers, dtype, kv, checkpointing, targets=("wq", "wk", "wv", "wo")):
        cfg = llama.LlamaConfig(dim=256, n_layers=n_layers, n_heads=8, n_kv_heads=kv, vocab_size=256,
                                hidden_dim=688, max_seq_len=128)
        torch.manual_seed(0)
        model = llama.Llama(cfg).to(dtype)
        if targets:  # () = full fine-tuning: every weight trains
            lora.add_lora(model, rank=8, alpha=64, dropout=0.1, targets=targets, lora_dtype=torch.float32)
        model.train()
        model.activation_checkpointing = checkpointing
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept, storages = [], {}

        def pack(t):
            kept.append(t)  # keep every saved tensor alive, so no storage is reused while counting
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        tokens, mask = llama.left_pad([list(range(5, 50)), list(range(1, 49))])  # 2 x 48 tokens
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.hidden(tokens, mask)
        return sum(storages.values()), cfg

    for dtype, w in ((torch.float32, 4), (torch.bfloat16, 2)):
        for kv in (8, 2):
            (two, cfg), (one, _) = saved(2, dtype, kv, False), saved(1, dtype, kv, False)
            per_token_layer = (two - one) / 96
            estimate = plan.saved_bytes_per_token_layer(cfg, w)
            assert estimate <= per_token_layer <= 1.2 * estimate, (dtype, kv, per_token_layer, estimate)
            (two, _), (one, _) = saved(2, dtype, kv, True), saved(1, dtype, kv, True)
            assert (two - one) / 96 == plan.saved_bytes_per_token_layer(cfg, w, checkpointing=True) == w * cfg.dim
            # LoRA on all seven projections, and full fine-tuning (every input of a trained weight is kept)
            for targets, full in ((tuple(lora.TARGETS), False), ((), True)):
                (two, _), (one, _) = saved(2, dtype, kv, False, targets), saved(1, dtype, kv, False, targets)
                estimate = plan.saved_bytes_per_token_layer(cfg, w, False, targets, full)
                cpu_masks = 0 if full else (w - 1) * (6 * cfg.dim + cfg.hidden_dim)  # the masks in w bytes, not 1
                # and in bf16 each layer's A and B cast from fp32 (lora_A.to(x.dtype)), kept: 96 tokens share them
                casts = 0 if full or w == 4 else 2 * 8 * (8 * cfg.dim + 3 * (cfg.dim + cfg.hidden_dim)) / 96
                assert estimate <= (two - one) / 96 <= 1.05 * (estimate + cpu_masks + casts), (
                    dtype, kv, full, (two - one) / 96, estimate)


def flag(name, value):
    return lambda d, args, tmp: args + [name, value]


def prompts_file(text, binary=False):
    def edit(d, args, tmp):
        (tmp / "p.json").write_bytes(text) if binary else (tmp / "p.json").write_text(text)
        args[args.index("--prompts") + 1] = str(tmp / "p.json")
        return args
    return edit


def out_at(path):
    def edit(d, args, tmp):
        (tmp / "file").write_text("x")
        args[args.index("--out") + 1] = str(tmp / path)
        return args
    return edit


def resume_with(name, content, *flags):
    """--resume from a copy of a finished run whose file `name` (if any) is replaced by `content` (bytes)."""
    def edit(d, args, tmp):
        shutil.copytree(d["full"], tmp / "o", dirs_exist_ok=True)
        if name:
            target = tmp / "o" / name
            target.write_bytes(content(target.read_bytes()) if callable(content) else content)
        return args + ["--resume", "--steps", "5", *flags]
    return edit


def no_weights(d, args, tmp):
    (tmp / "empty").mkdir()
    for f in ("config.json", "tokenizer.model"):
        (tmp / "empty" / f).write_bytes((d["setup"] / "policy" / f).read_bytes())
    args[args.index("--policy") + 1] = str(tmp / "empty")
    return args


# case -> (how the good command is spoiled, what the one line must say): a few of each kind of bad input
BAD = {
    # a flag out of its range (every range: test_every_range_check_names_its_flag), or flags that disagree
    "temperature": (flag("--temperature", "-1"), "--temperature must be 0 (greedy) or a finite number >= 0.001"),
    "kl_nan": (flag("--kl-coef", "nan"), "--kl-coef must be a finite number >= 0"),
    "gamma": (flag("--gamma", "1.5"), "--gamma must be in [0, 1], got 1.5"),
    "estimator": (flag("--estimator", "kll"), "valid names: kl, clamped_kl"),
    "partial_args": (lambda d, a, t: a[2:], "together"),
    "divide": (flag("--step-batch-size", "3"), "not divisible"),
    # devices
    "no_gpu": (flag("--devices", "cuda:7"), "does not exist on this machine"),
    "meta_device": (flag("--devices", "meta"), "--devices: meta is not supported"),
    # input files and OUT
    "no_prompts": (lambda d, a, t: a[:a.index("--prompts") + 1] + [str(t / "none.json")] + a[a.index("--prompts") + 2:],
                   "does not exist"),
    "bad_record": (prompts_file('{"instruction": "a"}\n{"input": "b"}\n'), "record 1"),
    "not_utf8": (prompts_file(b'[{"instruction": "caf\xe9"}]', binary=True), "p.json: not UTF-8 text"),
    "missing_weights": (no_weights, "no weights"),
    "out_is_a_file": (out_at("file"), "is a file, not a directory"),
    # resume
    "resume_nothing": (flag("--resume", None), "is missing"),
    "resume_truncated_state": (resume_with("checkpoint/state.pt", lambda b: b[:len(b) // 2]),
                               "checkpoint/state.pt is not a readable checkpoint file"),
    "resume_other_settings": (resume_with(None, None, "--lr", "2e-3"),
                              "checkpoint was written with other settings: --lr 0.001 -> 0.002"),
    "lora_target_twice": (flag("--lora-targets", "wq,w1,wq"), "--lora-targets must be some of wq,wk,wv,wo,w1,w3,w2"),
    "finetune_unknown": (flag("--finetune", "qlora"), "--finetune must be lora or full, got qlora"),
    "seed_overflow": (flag("--seed", str(10 ** 20)), "--seed must be in [0, 2**63), got 100000000000000000000"),
    "no_room": (flag("--max-new-tokens", "100000"), "--max-prompt-tokens 192 + --max-new-tokens 100000 exceed the "
                                                    "policy's context of 256 tokens"),
    "jsonl_line_2": (prompts_file('{"instruction": "a"}\n{"instruction": b}\n'), "malformed JSON on line 2"),
    "resume_other_rank_count": (resume_with("checkpoint/rng-rank1.pt", b"x"),
                                "was written by 2 rank(s), this run has 1; resume it with torchrun --nproc_per_node=2"),
    # a NaN during the run
    "nan": (flag("--lr", "1e30"), "stopped at PPO step 1, the checkpoint of step 0"),  # 1e30 overflows
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_ends_in_one_line(setup, uninterrupted, tmp_path, case, capsys):
    """Each bad flag or file ends in one line naming it, exit status 1, and no file in OUT changed (except
    after a NaN: the last good step is saved)."""
    import train
    spoil, message = BAD[case]
    args = spoil({"setup": setup, "full": uninterrupted}, base_args(setup, tmp_path / "o"), tmp_path)
    args = [a for a in args if a is not None]
    files = lambda: {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file() and p.name != ".lock"}
    before = files() if (tmp_path / "o").is_dir() else {}
    threads = torch.get_num_threads()
    assert train.cli(args) == 1
    torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    if case == "nan":  # the weights of the last finished step were saved, and the run can resume from them
        assert torch.load(tmp_path / "o" / "checkpoint" / "state.pt", weights_only=True)["step"] == 0
    elif (tmp_path / "o").is_dir():
        assert files() == before


def test_resume_refuses_to_move_a_schedule_that_ends_at_steps(uninterrupted, tmp_path):
    """Without --decay-steps the learning rate reaches 0 at --steps: resuming with other --steps would run steps at
    lr 0 (or jump the schedule), so it is refused in one line naming --decay-steps."""
    from support import rundir
    shutil.copytree(uninterrupted, tmp_path / "o")
    file = tmp_path / "o" / "checkpoint" / "state.pt"
    state = torch.load(file, weights_only=True)
    state["args"]["decay_steps"] = None  # as the small world's runs: the schedule ends at --steps (4)
    torch.save(state, file)
    with pytest.raises(ValueError, match=re.escape("checkpoint's learning rate decays to 0 at its --steps 4 "
                                                   "(--decay-steps unset); --steps 5 would change that schedule")):
        rundir.resume(str(tmp_path / "o"), 0, {**state["args"], "steps": 5}, ("steps",), None, None, None, None, None)


def test_every_range_check_names_its_flag():
    """Each entry of support/config.py's RANGES refuses a value out of range in one message naming its flag; the
    paper's defaults and the small world pass them all. Every field of Args has its doc (the flag's help), and
    --estimator's lists divergences.ESTIMATORS."""
    import train
    assert set(config.field_docs(train.Args)) == {f.name for f in dataclasses.fields(train.Args)} >= set(config.RANGES)
    assert config.field_docs(train.Args)["estimator"].endswith(": " + ", ".join(divergences.ESTIMATORS))
    good = ["--policy", ROOT, "--reward", ROOT, "--prompts", "x"]  # (directories: checked before any work)
    config.parse(train.Args, train.WORLD, [])
    config.parse(train.Args, train.WORLD, good)
    for flag in ("--eval-prompts", "--tokenizer"):  # files of real checkpoints: never ignored in the small world
        with pytest.raises(ValueError, match=f"{flag} applies to real checkpoints: the small world has its own"):
            config.parse(train.Args, train.WORLD, [flag, "x.json"])
        config.parse(train.Args, train.WORLD, good + [flag, "x.json"])
    for name, (test, what) in config.RANGES.items():
        flag = "--" + name.replace("_", "-")
        bad = next(v for v in ("-1", "0", "1.5", "nan", "inf") if not test(float(v)))  # -1 or 0 for the ints
        with pytest.raises(ValueError, match=re.escape(f"{flag} must be {what}, got")):
            config.parse(train.Args, train.WORLD, good + [flag, bad])


def test_out_of_gpu_memory_is_one_line(setup, tmp_path, monkeypatch, capsys):
    import ppo
    import train

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ppo, "generate_responses", oom)
    threads = torch.get_num_threads()
    assert train.cli(base_args(setup, tmp_path / "o")) == 1
    torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of GPU memory; a smaller --micro-batch-size"), err


def test_bad_input_is_one_line_on_the_command_line(setup, tmp_path):
    r = run(base_args(setup, tmp_path / "o", "--estimator", "kll"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: unknown divergence"), r.stderr


def test_lr_schedule_decays_over_the_papers_horizon():
    import train
    paper = train.lr_schedule(train.Args())
    assert [paper(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    # then linear to 0 at step 780 (10 epochs x ~20k prompts / 256), as the paper's fork: 0.88 lr at step 100,
    # a mean of 0.94 lr over steps 6-100 (decaying to 0 at step 100 would give 0.51)
    assert paper(99) == pytest.approx((780 - 99) / 775) and round(paper(99), 2) == 0.88
    assert sum(paper(s) for s in range(5, 100)) / 95 == pytest.approx(0.939, abs=1e-3)
    world = train.lr_schedule(train.WORLD)  # the small world still decays to 0 at --steps
    n = train.WORLD.steps
    assert [world(s) for s in range(n)] == [min((s + 1) / 5, max(0.0, (n - s) / (n - 5))) for s in range(n)]
    with pytest.raises(ValueError, match="--decay-steps must be at least --steps 1000"):
        config.parse(train.Args, train.WORLD, ["--policy", ROOT, "--reward", ROOT, "--prompts", "x", "--steps", "1000"])


class RunsCode:
    """Unpickling this creates a directory: a loader must refuse it before that happens."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


# bad files end in one line naming the file: case -> (file, how it is spoiled, message fragment)
SPOILED = {"policy_truncated": ("policy/model.safetensors", "truncate", "not a readable safetensors file"),
           "policy_pickle": ("policy/pytorch_model.bin", "pickle", "could run code"),
           "tokenizer_garbage": ("policy/tokenizer.model", "garbage", "expected a sentencepiece model"),
           "heads_zero": ("policy/config.json", "heads", "num_attention_heads = 0 must be a positive integer"),
           "adapter_pickle": ("adapter/adapter_model.bin", "pickle", "could run code")}


@pytest.mark.parametrize("case", list(SPOILED))
def test_bad_files_one_line(setup, tmp_path, capsys, case):
    import sample
    import train
    file, how, fragment = SPOILED[case]
    for name in ("policy", "reward"):
        shutil.copytree(setup / name, tmp_path / name)
    model = llama.Llama(CFG)
    lora.add_lora(model, rank=2, alpha=4)
    checkpoints.save_adapter(model, str(tmp_path / "adapter"))
    path = tmp_path / file
    if how in ("truncate", "empty"):
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2 if how == "truncate" else 0])
    elif how == "pickle":
        os.remove(path.with_name("model.safetensors" if "policy" in file else "adapter_model.safetensors"))
        torch.save({"x": torch.zeros(2), "y": RunsCode(str(tmp_path / "ran"))}, path)
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_attention_heads": 0}))
    threads = torch.get_num_threads()
    if file.startswith("adapter"):
        code = sample.cli(["--checkpoint", str(tmp_path / "policy"), "--adapter", str(tmp_path / "adapter"),
                           "--prompt", "red", "--max-new-tokens", "2"])
    else:
        code = train.cli(base_args(setup, tmp_path / "o", "--policy", str(tmp_path / "policy"),
                                   "--reward", str(tmp_path / "reward")))
    torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {path}") and fragment in err[0], err
    assert not (tmp_path / "ran").exists()


def test_evaluate_against_each_prompt_alone_in_float64(setup, tmp_path):
    """sample.evaluate (train.py's evaluation) against an independent computation: each prompt's greedy
    response generated alone (no padding), the exact KL(pi || pi_ref) of the response summed over the vocabulary
    in float64 from a plain forward of the whole sequence, the reward head on its last hidden state, and the
    length. A batched evaluation that mixed up padding, positions or rows would differ."""
    import sample
    tok = llama.Tokenizer(str(setup / "policy" / "tokenizer.model"))
    policy = checkpoints.load_llama(str(setup / "policy"))
    lora.add_lora(policy, rank=4, alpha=8.0, dropout=0.0)
    torch.manual_seed(3)
    for _, _, m in lora.lora_layers(policy):  # B != 0: the policy is away from its reference
        torch.nn.init.normal_(m.lora_B, std=0.3)
    rm = checkpoints.load_reward_model(str(setup / "reward"))
    records = json.load(open(setup / "prompts.json"))[:5]
    out_file = tmp_path / "eval" / "step0001.json"
    stats = sample.evaluate(policy, None, rm, tok, records, max_new_tokens=6, batch_size=3, out_file=str(out_file),
                            generator_name="g")
    kl, score, length, texts = [], [], [], []
    with torch.no_grad():
        for r in records:
            x = torch.tensor([tok.encode(llama.alpaca_prompt(r["instruction"], r["input"]))])  # (1, P)
            y, m = llama.generate(policy, x, torch.ones_like(x), 6, temperature=0, eos_id=tok.eos_id)
            y = y[:, :int(m.sum())]  # (1, n)
            full, P = torch.cat([x, y], 1), x.shape[1]
            logp = policy(full).double().log_softmax(-1)[0, P - 1:-1]  # (n, V): the states before each y_t
            with lora.lora_disabled(policy):
                logq = policy(full).double().log_softmax(-1)[0, P - 1:-1]
            kl.append((logp.exp() * (logp - logq)).sum().item())
            score.append(rm.reward_head(rm.backbone.hidden(full)[0, -1]).item())
            length.append(y.shape[1])
            texts.append(tok.decode(y[0].tolist()).strip())
    assert min(kl) > 1e-3, "the LoRA update moves the policy"
    assert stats["eval_true_kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    assert stats["eval_score"] == pytest.approx(sum(score) / len(score), rel=1e-4, abs=1e-6)
    assert stats["eval_length"] == sum(length) / len(length)
    assert set(stats) == {"eval_true_kl", "eval_score", "eval_length"}  # no world: no annotator
    for g in (2, 5):  # the responses decoded in other batches: the same numbers, bit for bit
        assert sample.evaluate(policy, None, rm, tok, records, 6, 3, generate_batch_size=g) == stats, g
    assert json.load(open(out_file)) == [{"instruction": r["instruction"], "input": r["input"], "output": t,
                                          "generator": "g"} for r, t in zip(records, texts)]


def test_each_local_rank_takes_the_next_free_devices(monkeypatch):
    """--devices names rank 0's GPUs; local rank r takes the r-th next set (CPU entries stay), and a GPU that a
    rank's share would need but the machine lacks is one line naming the rank."""
    from support import plan
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    names = lambda spec, r: [str(d) for d in plan.pick_devices(spec, r, 2)]
    assert names("cuda:0,cuda:1", 0) == ["cuda:0", "cuda:1"] and names("cuda:0,cuda:1", 1) == ["cuda:2", "cuda:3"]
    assert names("cuda:1,cpu", 1) == ["cuda:2", "cpu"] and names("cpu", 1) == ["cpu"]
    assert names(None, 1) == ["cuda:2", "cuda:3"]  # default: two GPUs per rank when there are enough
    with pytest.raises(ValueError, match=r"cuda:4 does not exist .* local rank 1's share of --devices cuda:2,cuda:3"):
        plan.pick_devices("cuda:2,cuda:3", 1, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 6)
    assert names("cuda:0,cuda:2", 1) == ["cuda:3", "cuda:5"]  # the next span, not overlapping rank 0's cuda:2


def test_evaluation_prompts_are_kept_whole_unless_they_cannot_be_answered(setup, tmp_path):
    """Held-out prompts are all kept, longer than --max-prompt-tokens or not, except one that leaves no room in the
    policy's context for --max-new-tokens (generate would fail on it); the run says how many it dropped, and with
    none left it ends in one line naming the file."""
    import train
    tok = llama.Tokenizer(str(setup / "policy" / "tokenizer.model"))
    size = lambda r: len(tok.encode(llama.alpaca_prompt(r["instruction"], r["input"])))
    limit = max(size(r) for r in json.load(open(setup / "prompts.json")))  # every PPO prompt fits
    records = [{"instruction": "sort the words", "input": ""}, {"instruction": "red blue " * 30, "input": "cat"},
               {"instruction": "red blue " * 90, "input": "dog"}]
    new = CFG.max_seq_len - size(records[1])  # the second fills the context exactly, the third overflows it
    assert size(records[0]) <= limit < size(records[1]) < size(records[2]) and new >= 1
    (tmp_path / "eval.json").write_text(json.dumps(records))
    (tmp_path / "long.json").write_text(json.dumps(records[2:]))
    args = train.Args(policy=str(setup / "policy"), prompts=str(setup / "prompts.json"),
                      eval_prompts=str(tmp_path / "eval.json"), max_prompt_tokens=limit, max_new_tokens=new)
    lines = []
    _, _, kept = data.read(args, lines.append)
    assert kept == records[:2]
    assert lines[-1] == (f"eval prompts: 2 of 3 from {tmp_path / 'eval.json'} (dropped 1 longer than "
                         f"{size(records[1])} tokens, which leave no room for --max-new-tokens {new})")
    with pytest.raises(ValueError, match=r"long.json: no prompt leaves room for --max-new-tokens"):
        data.read(dataclasses.replace(args, eval_prompts=str(tmp_path / "long.json")), lines.append)


def test_two_ranks_of_the_small_world_are_told_the_micro_batch_that_fits():
    """The small world's step batch (32) split over two ranks is 16 per rank: its micro-batch of 32 cannot nest, and
    the one line says which does (the README's two-rank command)."""
    import train
    from support import plan
    with pytest.raises(ValueError, match=re.escape("per rank = 16 is not divisible by 32 (rollout = k x step batch, "
                                                   "step batch = ranks x micro-batches x k); e.g. --micro-batch-size 16")):
        plan.check_batches(train.WORLD, 2)
    assert plan.check_batches(dataclasses.replace(train.WORLD, micro_batch_size=16), 2) == 32


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_ctrl_c_while_torch_loads_is_one_line(script):
    """SIGINT in the first second, while the imports run (torch takes longer than that to load): one line and
    status 130, not a traceback through the imports."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "interrupted (SIGINT) while starting\n" and out == "", (p.returncode, err)
