"""train.py: two-rank torchrun on CPU (gloo), exact resume, --dry-run for LLaMA-7B, and bad input."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import llama
from reward import RewardModel

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


def test_resume_equals_uninterrupted(setup, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    r = run(base_args(setup, full, "--steps", "4"))
    assert r.returncode == 0, r.stderr
    # the same run, killed (SIGKILL) as soon as its first checkpoint is published, then resumed
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
    a, b = metrics(full), metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m in a:  # the timings are logged: generation and scoring are parts of the rollout
        assert min(m[k] for k in ("time_generate", "time_score", "time_train", "tokens_per_s")) > 0, m
        assert m["time_generate"] + m["time_score"] <= m["time_rollout"], m
    for ma, mb in zip(a, b):
        for k in DETERMINISTIC:
            assert ma[k] == mb[k], (ma["step"], k, ma[k], mb[k])
    from safetensors.torch import load_file
    wa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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


def test_a_new_run_never_overwrites_an_earlier_one(setup, tmp_path):
    out = tmp_path / "o"
    for i in (1, 2, 3):  # the same command three times into the same OUT
        r = run(base_args(setup, out, "--steps", "1", "--seed", str(i)))
        assert r.returncode == 0, r.stderr
    run_files = ["adapter", "checkpoint", "metrics.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == [".lock"] + run_files + ["previous-1", "previous-2"]
    assert (out / ".lock").read_text() == ""  # released: the last run ended
    for prev, seed in ((out / "previous-1", 1), (out / "previous-2", 2), (out, 3)):  # each run's files, whole
        assert sorted(p.name for p in prev.iterdir() if "previous" not in p.name and p.name != ".lock") == run_files
        assert torch.load(prev / "checkpoint" / "state.pt", weights_only=True)["args"]["seed"] == seed
        assert [m["step"] for m in metrics(prev)] == [1]
    assert f"to {out}/previous-2 (`--out {out}/previous-2 --resume` would continue it)" in r.stdout


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


def test_dry_run_7b():
    r = run(["--preset", "llama-7b", "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert ("policy LoRA 8,388,608 + value LoRA 8,388,608 + value head 4097 = 16,781,313 trainable, 0.249% of the "
            "6,738,415,616 parameters") in r.stdout
    lines = r.stdout.splitlines()
    row = lambda prefix: next(l for l in lines if l.startswith(prefix)).split()
    # bf16 weights: policy + value on the first GPU, reference + reward model (+ its 4097-parameter head) on the
    # second (both keep the unused LM head, as AlpacaFarm's files do); trainable: fp32 weight, grad, 2 Adam moments
    assert row("two-device")[-2:] == [f"{2 * 6_738_415_616 * 2 / 2**30:.2f}", f"{16_781_313 * 16 / 2**30:.2f}"]
    assert row("             cuda:1")[-1] == f"{(2 * 6_738_415_616 + 4097) * 2 / 2**30:.2f}"
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


def test_dry_run_activation_estimate_against_autograd():
    """plan.saved_bytes_per_token_layer against the bytes autograd really keeps (saved_tensors_hooks, storages
    counted once, parameters excluded), per layer: the difference between a 2- and a 1-layer LoRA model. On the
    CPU dropout keeps its mask in the input dtype, not 1 byte, and the formula leaves out small terms, so the
    measurement may exceed it, by at most 20% here (14-18% measured); dropping a term (SwiGLU is ~40% of
    it) or double counting fails. With activation checkpointing a block keeps exactly its input (the
    checkpoint saves it through the same hooks; what the block saved inside is recomputed in backward)."""
    import lora
    import plan

    def saved(n_layers, dtype, kv, checkpointing):
        cfg = llama.LlamaConfig(dim=256, n_layers=n_layers, n_heads=8, n_kv_heads=kv, vocab_size=256,
                                hidden_dim=688, max_seq_len=128)
        torch.manual_seed(0)
        model = llama.Llama(cfg).to(dtype)
        lora.add_lora(model, rank=8, alpha=64, dropout=0.1, lora_dtype=torch.float32)
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


BAD = {"estimator": "valid names: kl, clamped_kl", "no_prompts": "does not exist", "bad_record": "record 1",
       "missing_ckpt": "no weights", "divide": "not divisible", "device": "does not exist on this machine",
       "partial_args": "together", "resume_nothing": "is missing", "nan": "stopped at PPO step 1, the checkpoint of step 0"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_clear_message(setup, tmp_path, case):
    import train
    args = base_args(setup, tmp_path / "o")
    if case == "estimator":
        args += ["--estimator", "kll"]
    elif case == "no_prompts":
        args[args.index("--prompts") + 1] = str(tmp_path / "none.json")
    elif case == "bad_record":
        (tmp_path / "p.jsonl").write_text('{"instruction": "a"}\n{"input": "b"}\n')
        args[args.index("--prompts") + 1] = str(tmp_path / "p.jsonl")
    elif case == "missing_ckpt":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((setup / "policy" / "config.json").read_text())
        (tmp_path / "empty" / "tokenizer.model").write_bytes((setup / "policy" / "tokenizer.model").read_bytes())
        args[args.index("--policy") + 1] = str(tmp_path / "empty")
    elif case == "divide":
        args += ["--step-batch-size", "3"]
    elif case == "device":
        args += ["--devices", "cuda:7"]
    elif case == "partial_args":
        args = args[2:]
    elif case == "resume_nothing":
        args += ["--resume"]
    else:
        args += ["--lr", "1e30"]  # weights of 1e30 overflow the next forward
    threads = torch.get_num_threads()
    with pytest.raises((ValueError, FileNotFoundError, FloatingPointError), match=BAD[case]):
        train.main(args)
    torch.set_num_threads(threads)
    if case == "nan":  # the weights of the last finished step were saved, and the run can resume from them
        assert torch.load(tmp_path / "o" / "checkpoint" / "state.pt", weights_only=True)["step"] == 0


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
