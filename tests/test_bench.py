"""tools/bench.py: the FLOP count against PyTorch's own counter, and a tiny --ppo run on the CPU."""
import math
import os
import subprocess
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tools import bench
import llama

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


def test_ppo_bench_runs_on_the_cpu():
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--ppo", "--preset", "tiny",
                        "--rollout-batch", "8", "--step-batch", "4", "--prompt-len", "8", "--new-tokens", "6",
                        "--micro-batches", "2", "4", "--checkpointing", "off", "on", "--generate-batch", "4",
                        "--threads", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [[x.strip(" *") for x in l.split("|")[1:-1]] for l in r.stdout.splitlines() if l.startswith("| ")][1:]
    phases = [(c[0].split(":")[0].split(" of ")[0], c[1], c[2]) for c in rows]
    step = [("update", "off"), ("a whole PPO step", "off"), ("update", "on"), ("a whole PPO step", "on")]
    assert phases == [("decoding step", "", ""), ("rollout", "", "")] + [
        p for mb in ("2", "4") for p in [("rollout", mb, "")] + [(name, mb, c) for name, c in step]]
    for c in rows:  # seconds, tokens/s, TFLOP/s, GB/s (but for a whole step) and the plan's peak: positive numbers
        values = [float(c[i].split()[0]) for i in (3, 4, 5, 6, 8) if c[i] != "-"]
        assert len(values) == (4 if c[0] == "a whole PPO step" else 5), c
        assert all(math.isfinite(v) and v > 0 for v in values), c
