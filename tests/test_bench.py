"""tools/bench.py: the FLOP count against PyTorch's own counter, and a tiny --ppo run on the CPU."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tools import bench
import llama
import train
from support import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_flops_of_a_decoding_step_equal_the_counted_ones():
    """One decoding step of generate's static cache (3 sequences, 5-token prompts, a cache of 12 slots) through
    torch.utils.flop_counter, with SDPA's math kernel so that attention is counted as two matrix products."""
    cfg, P, N, B = llama.PRESETS["tiny"], 5, 7, 3
    torch.manual_seed(0)
    model = llama.Llama(cfg).eval()
    tokens, start = torch.randint(0, cfg.vocab_size, (B, P)), torch.zeros(1, dtype=torch.long)
    cache = model.new_cache(B, P + N)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.hidden(tokens, None, cache, start)
        with FlopCounterMode(display=False) as counter:
            model(tokens[:, -1:], None, cache, start + P)
    assert counter.get_total_flops() == bench.model_flops(cfg, P, N, B, "step")
    # and the update at LLaMA-7B's shape is ~4 x parameters x tokens (2 epochs x 256 x 492 tokens, two models)
    seven_b = llama.PRESETS["llama-7b"]
    assert abs(bench.model_flops(seven_b, 192, 300, 256, "update", 2) / (4 * 6.74e9 * 2 * 256 * 492 * 2) - 1) < 0.03


def test_ppo_bench_counts_what_each_phase_did():
    """A tiny --ppo run on the CPU: each row's tokens/s x seconds is the phase's token count (R x N new tokens for
    generate, R x (P + N) for score, epochs x R x (P + N) for the update), its TFLOP/s and GB/s give back
    model_flops and read_bytes, a whole step takes the sum of its phases, and the plan column is the plan of the
    same models (frozen weights + 16 bytes per trainable parameter + plan.phase_bytes). Printed to 3 significant
    digits, so within 1%. The CPU has no peak-memory counter: that column is '-'."""
    R, S, P, N, G = 8, 4, 8, 6, 4
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--ppo", "--preset", "tiny",
                        "--rollout-batch", str(R), "--step-batch", str(S), "--prompt-len", str(P),
                        "--new-tokens", str(N),
                        "--micro-batches", "2", "4", "--checkpointing", "off", "on", "--generate-batch", str(G),
                        "--threads", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [[x.strip(" *") for x in l.split("|")[1:-1]] for l in r.stdout.splitlines() if l.startswith("| ")][1:]
    phases = [(c[0].split(":")[0].split(" of ")[0], c[1], c[2]) for c in rows]
    step = [("update", "off"), ("a whole PPO step", "off"), ("update", "on"), ("a whole PPO step", "on")]
    assert phases == [("decoding step", "", ""), ("rollout", "", "")] + [
        p for mb in ("2", "4") for p in [("rollout", mb, "")] + [(name, mb, c) for name, c in step]]

    cfg, epochs = llama.PRESETS["tiny"], train.Args().ppo_epochs
    policy, value, reward_model = bench.ppo_models(cfg, torch.device("cpu"), torch.float32)
    frozen = sum(p.numel() for m in (policy, reward_model) for p in m.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for m in (policy, value) for p in m.parameters() if p.requires_grad)
    args = SimpleNamespace(max_prompt_tokens=P, max_new_tokens=N, generate_batch_size=G, finetune="lora",
                           lora_targets="wq,wk,wv,wo")
    planned = lambda mb, ckpt, i: (4 * frozen + 16 * trainable + plan.phase_bytes(cfg, args, 4, mb, ckpt)[i]) / 2**30
    close = lambda got, want: abs(got / want - 1) < 0.01
    times = {}
    for c in rows:
        name, mb, ckpt = c[0], int(c[1] or 1), c[2] == "on"
        seconds = float(c[3].split()[0]) / (1000 if c[3].endswith("ms") else 1)
        tps, tflops, plan_gib = float(c[4]), float(c[5]), float(c[8])
        assert seconds > 0 and c[7] == "-", c
        if name.startswith("decoding step"):
            tokens, flops, nbytes, i = G, bench.model_flops(cfg, P, N, G, "step"), \
                bench.read_bytes(cfg, P, N, G, "step", G, 4), 0
            key = "decoding step"
        elif name.startswith("rollout: generate"):
            tokens, flops, nbytes, i = R * N, bench.model_flops(cfg, P, N, R, "generate"), \
                bench.read_bytes(cfg, P, N, R, "generate", G, 4), 0
            key = "generate"
        elif name.startswith("rollout: score"):
            tokens, flops, nbytes, i = R * (P + N), bench.model_flops(cfg, P, N, R, "score"), \
                bench.read_bytes(cfg, P, N, R, "score", mb, 4), 1
            key = "score", mb
        elif name.startswith("update"):
            tokens, flops, nbytes, i = epochs * R * (P + N), bench.model_flops(cfg, P, N, R, "update", epochs), \
                bench.read_bytes(cfg, P, N, R, "update", mb, 4, epochs), 2
            key = "update", mb, ckpt
        else:  # a whole PPO step: generate + score + update of this micro-batch and checkpointing
            total = times["generate"] + times["score", mb] + times["update", mb, ckpt]
            assert close(seconds, total), (c, total)
            flops = sum(bench.model_flops(cfg, P, N, R, ph, epochs) for ph in ("generate", "score", "update"))
            assert close(tps * seconds, R * N) and close(tflops * 1e12 * seconds, flops) and c[6] == "-", c
            assert close(plan_gib, max(planned(mb, ckpt, i) for i in range(3))), c
            continue
        assert close(tps * seconds, tokens), (c, tokens)
        assert close(tflops * 1e12 * seconds, flops) and close(float(c[6]) * 1e9 * seconds, nbytes), c
        assert close(plan_gib, planned(mb, ckpt, i)), (c, planned(mb, ckpt, i))
        times[key] = seconds
    # the plan's invariants: checkpointing keeps less for the update, a larger micro-batch more
    assert planned(4, True, 2) < planned(4, False, 2) and planned(2, False, 2) < planned(4, False, 2)


@pytest.mark.parametrize("flags, message", [(["--repeats", "0"], "--repeats must be positive, got 0"),
                                            (["--threads", "0"], "--threads must be positive, got 0"),
                                            (["--batches", "4", "0"], r"--batches must be positive, got \[4, 0\]"),
                                            (["--budget", "nan"], "--budget must be positive, got nan"),
                                            (["--device", "tpu3"], "--device 'tpu3' is not a device name"),
                                            (["--ppo", "--micro-batches", "3", "--step-batch", "8"],
                                             "--rollout-batch 256 must be a multiple of --step-batch 8"),
                                            (["--ppo", "--preset", "tiny", "--new-tokens", "1000"],
                                             "--new-tokens 1000 must be >= 1 and fit the context of 256")]
                         + ([] if torch.cuda.is_available() else
                            [(["--device", "cuda"], "--device cuda: this machine has no CUDA device")]))
def test_bad_flags_are_refused_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        bench.main(flags)
