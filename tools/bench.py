"""
Benchmark (not a test): how fast llama.py generates and trains, on random weights of a preset.

    python -m tools.bench                      # CPU, fp32, preset "small" (~106M parameters), 256 new tokens
    python -m tools.bench --device cuda        # bf16 by default on a GPU
    python -m tools.bench --repeats 3 --threads 2 --budget 300
    python -m tools.bench --ppo --preset llama-7b --device cuda   # one PPO step at the paper's sizes, on one GPU

Measures, after a warm-up, the best wall time of --repeats runs (as timeit does: interference from other
processes only ever adds time) of
  1. generation with llama.generate at batch 1 and 16 from a 16-token prompt, with the KV cache and
     without (generate_without_cache below re-runs the whole sequence each step). eos_id=None, so every run generates
     exactly --new-tokens tokens; tokens/s counts new tokens. Without the cache a run of N new tokens
     pushes B * S(N) tokens through the layers, S(N) = N * P + N * (N - 1) / 2 for a P-token prompt.
     When that is estimated to take longer than
     --budget seconds (from a timed forward pass of the full length), N is halved until it fits; the row
     says the N measured, a cached row is measured at the same N (and one at --new-tokens), and a line
     under the table extrapolates to --new-tokens by the ratio of S, labelled as an estimate.
  2. forward + backward (cross-entropy on next tokens) at batch 8 x 256 tokens: the full model trainable,
     then LoRA rank 8 on wq, wk, wv, wo (lora.add_lora, alpha 64, dropout 0.1) with the rest frozen.
With --ppo instead: one PPO step of the real code (ppo.generate_responses, ppo.score_rollout, then
ppo.ppo_update) in train.py's one-device placement (the reference is the policy with its adapters off, the
reward model the value model's backbone with its adapters off): --rollout-batch prompts of --prompt-len
tokens, --new-tokens each (eos_id=None: every response has full length, the worst case), generated in
chunks of --generate-batch (with the decoding step as a CUDA graph unless --no-cuda-graph), scored, then
updated once for each --micro-batches size and each --checkpointing setting (the speed does not depend on
the weights an earlier update left). First, and as the warm-up of every kernel: one decoding step of
--generate-batch sequences at the rollout's cache length, repeated. Per phase: seconds, tokens/s, model
FLOP/s and the bytes of weights and KV cache the phase must read per second (model_flops and read_bytes
below), as a share of the device's nominal limits where known (DEVICE_LIMITS), the device's peak memory
and the plan's (support/plan.py) for the same phase.
Prints a markdown table. Random N(0, 0.02) weights: the speed does not depend on the values.
Run it on an otherwise idle machine (the header and footer print the load average): when another process
keeps a core busy, every multi-threaded op waits for a descheduled thread, and small ops (LoRA's rank-8
matmuls, elementwise ops) then cost as much as large ones.
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130

import argparse
import math
import os
import platform
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import ppo
import train
from llama import Llama, generate
from lora import add_lora, count_parameters
from reward import RewardModel, ValueModel
from support import config, cudagraph, exits, plan


def hardware(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def best_time(fn, repeats, device):
    """(seconds, cores) of the fastest of `repeats` calls; cores = CPU time / wall time of this process,
    about --threads on an idle machine, lower when other processes took our cores."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t, c = time.perf_counter() - t0, time.process_time() - c0
        best = min(best, (t, c / t))
    return best


def S(n, p):  # tokens per row that generate_without_cache pushes through the layers for n new tokens
    return n * p + n * (n - 1) // 2


@torch.no_grad()
def generate_without_cache(model, tokens, n, generator):
    """What llama.generate would cost without its KV cache: the whole sequence through the model for every new
    token (no padding, no EOS; the baseline of the cache speed-up)."""
    for _ in range(n):
        logits = model(tokens)[:, -1]
        tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1, generator=generator)], 1)
    return tokens


# nominal dense bf16 tensor-core TFLOP/s and HBM bandwidth in GB/s, from NVIDIA's data sheets (SXM unless named)
DEVICE_LIMITS = {"H200": (989, 4800), "H100 NVL": (835, 3900), "H100 PCIe": (756, 2000), "H100": (989, 3350),
                 "A100-SXM4-80GB": (312, 2039)}


def device_limits(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next(((k, *v) for k, v in DEVICE_LIMITS.items() if k in name), None)


def model_flops(cfg, P, N, rows, phase, epochs=1):
    """Multiply-adds x 2 the phase's matrix products need for `rows` sequences of P prompt + N response tokens
    (LoRA's rank-8 products and the recomputation of checkpointing not counted). Per token and model: 2 W
    (the blocks' projections) + the causal attention 4 dim x keys per layer, and the LM head 2 dim V where
    logits are needed. step: one decoding step at the last slot; generate: P + N - 1 tokens through the
    policy, N heads; score: four forwards (policy, reference, value, reward model), two heads over N;
    update: policy and value, forward and backward of the activations (2 x forward: frozen weights get no
    gradient), one head."""
    kv = (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
    W = cfg.n_layers * (2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.hidden_dim)
    T, head, attn = P + N, 2 * cfg.dim * cfg.vocab_size, 4 * cfg.dim * cfg.n_layers  # attn: per key
    body = 2 * W * T + attn * T * (T - 1) / 2  # every token's keys, summed over the sequence
    per_row = {"step": 2 * W + attn * T + head, "generate": body - 2 * W + N * head,
               "score": 4 * body + 2 * N * head, "update": epochs * 2 * (2 * body + N * head)}[phase]
    return rows * per_row


def read_bytes(cfg, P, N, rows, phase, chunk, w, epochs=1):
    """The least the phase must read from memory: the frozen weights (w bytes each) once per pass over a
    chunk of rows, and in decoding the whole static KV cache (chunk x (P + N) slots) at every step."""
    kv = (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
    weights = w * (cfg.n_layers * (2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.hidden_dim)
                   + cfg.dim * cfg.vocab_size)
    n_chunks = -(-rows // chunk)
    cache = 2 * cfg.n_layers * chunk * (P + N) * kv * w
    return {"step": weights + cache, "generate": n_chunks * (N * weights + (N - 1) * cache),
            "score": n_chunks * 4 * weights, "update": epochs * n_chunks * 2 * 2 * weights}[phase]


@torch.no_grad()
def decode_step(policy, prompts, mask, N, cuda_graph, device, repeats=20):
    """Seconds of one warm decoding step of generate (batch prompts.shape[0], a cache of P + N slots)."""
    policy.eval()
    cache, start = policy.new_cache(prompts.shape[0], prompts.shape[1] + N), torch.zeros(1, dtype=torch.long,
                                                                                          device=device)
    policy.hidden(prompts, mask, cache, start)
    start += prompts.shape[1]
    step = lambda token, start: policy(token, None, cache, start)[:, -1]  # as in llama.generate
    token = prompts[:, -1:]
    if cuda_graph:
        step = cudagraph.capture(step, token, start)
    step(token, start)
    return best_time(lambda: [step(token, start) for _ in range(repeats)], 3, device)[0] / repeats


def ppo_models(cfg, device, dtype):
    """(policy with LoRA, value model with LoRA, reward model) at a preset's shape, in train.py's one-device
    placement (the value model is built on the reward model's backbone); random weights, created in dtype on
    the device (no fp32 copy of 7B)."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            policy, reward_model = Llama(cfg), RewardModel(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    add_lora(policy, rank=8, alpha=64, dropout=0.1, lora_dtype=torch.float32)
    reward_model.requires_grad_(False)
    value = ValueModel(reward_model.backbone, rank=8, alpha=64, dropout=0.1, lora_dtype=torch.float32)
    return policy, value, reward_model


def print_ppo_header(args, device, dtype, n_trainable, gib, graph, limits):
    P = args.prompt_len
    print(f"# {hardware(device)}; {args.preset}, {str(dtype).removeprefix('torch.')} weights; one-device placement; "
          f"{n_trainable:,} trainable; weights + LoRA on the device: {gib:.2f} GiB; "
          f"CUDA graph {'on' if graph else 'off'}; load average {os.getloadavg()[0]:.2f}")
    print(f"# nominal limits of the {limits[0]} (data sheet): {limits[1]} TFLOP/s dense bf16, {limits[2]} GB/s "
          f"memory bandwidth" if limits else "# nominal limits of this device: unknown")
    print(f"# prompts {P} tokens, temperature 1, top-p 1, estimator js; tokens/s: new tokens for generate, sequences "
          f"for the decoding step, prompt + response tokens (x epochs) otherwise; TFLOP/s: model FLOPs "
          f"(bench.model_flops), GB/s: weights and KV cache read (bench.read_bytes), each with its share of the "
          f"nominal limit; peak memory: the device's, from the start of the phase; plan: plan.phase_bytes + "
          f"weights + trainable state; a whole step: generate + score + update, its tokens/s response tokens, its "
          f"peak the largest")
    print("\n| phase | micro-batch | checkpointing | seconds | tokens/s | TFLOP/s | GB/s | peak memory (GiB) | plan (GiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)


def bench_ppo(args, device, dtype):
    """One PPO step at a preset's shape: generate, score, then the update per micro-batch and checkpointing.
    Long because it is a list: one phase after another, each measured and printed as soon as it ends."""
    cfg = plan.get_preset(args.preset)
    P, N, R, G = args.prompt_len, args.new_tokens, args.rollout_batch, args.generate_batch
    cuda, graph = device.type == "cuda", device.type == "cuda" and args.cuda_graph
    gib = lambda: torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    policy, value, reward_model = ppo_models(cfg, device, dtype)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, eps=1e-5, weight_decay=0.0)
    scheduler, w = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), torch.finfo(dtype).bits // 8
    # the plan of the same run: weights + trainable state + phase (plan.phase_bytes)
    frozen = sum(p.numel() for m in (policy, reward_model) for p in m.parameters() if not p.requires_grad)
    plan_args = SimpleNamespace(max_prompt_tokens=P, max_new_tokens=N, generate_batch_size=G, finetune="lora",
                                lora_targets="wq,wk,wv,wo")
    plan_gib = lambda mb, ckpt, i: (frozen * w + sum(p.numel() for p in params) * 16
                                    + plan.phase_bytes(cfg, plan_args, w, mb, ckpt)[i]) / 2**30
    limits = device_limits(device)
    print_ppo_header(args, device, dtype, sum(p.numel() for p in params), gib(), graph, limits)
    prompts = torch.randint(3, cfg.vocab_size, (R, P), device=device)
    mask = torch.ones_like(prompts)
    num = lambda x: "-" if x != x else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"
    share = lambda x, i: num(x) + (f" ({100 * x / limits[i]:.0f}%)" if limits and x == x else "")

    def row(name, mb, ckpt, seconds, tps, tflops, gbs, mem, planned):
        print(f"| {name} | {mb} | {ckpt} | {seconds} | {tps:.0f} | {share(tflops, 1)} | {share(gbs, 2)} | {num(mem)} | "
              f"{num(planned)} |", flush=True)

    def phase(name, mb, ckpt, fn, tokens, flops, nbytes, plan_peak):
        """(seconds, peak GiB) of fn, printed as a row; None when the device ran out of memory."""
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            t, _ = best_time(fn, 1, device)
        except torch.cuda.OutOfMemoryError:
            row(f"{name}: out of device memory", mb, ckpt, "-", float("nan"), float("nan"), float("nan"), gib(), plan_peak)
            return None
        row(name, mb, ckpt, num(t), tokens / t, flops / t / 1e12, nbytes / t / 1e9, gib(), plan_peak)
        return t, gib()

    # 1. one warm decoding step (and the warm-up of every kernel of the rollout)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = decode_step(policy, prompts[:G], mask[:G], N, graph, device)
    row(f"decoding step of {G} sequences, cache of {P + N} tokens", "", "", f"{num(1000 * t)} ms", G / t,
        model_flops(cfg, P, N, G, "step") / t / 1e12, read_bytes(cfg, P, N, G, "step", G, w) / t / 1e9, gib(),
        plan_gib(1, False, 0))
    pcfg = lambda mb: train.Args(estimator="js", step_batch_size=min(args.step_batch, R), micro_batch_size=mb,
                                 max_new_tokens=N, generate_batch_size=G, cuda_graph=args.cuda_graph)
    out = {}
    # 2. generate
    gen = torch.Generator(device).manual_seed(0)
    generated = phase(f"rollout: generate {R} x {N} new tokens (batches of {G})", "", "",
                      lambda: out.update(r=ppo.generate_responses(policy, prompts, mask, pcfg(1), None, generator=gen)),
                      R * N, model_flops(cfg, P, N, R, "generate"), read_bytes(cfg, P, N, R, "generate", G, w),
                      plan_gib(1, False, 0))
    for mb in args.micro_batches if generated else []:
        # 3. score, 4. update
        scored = phase(f"rollout: score (policy, reference, value, reward model; {R} x {P + N} tokens)", mb, "",
                       lambda: out.update(b=ppo.score_rollout(policy, value, reward_model, prompts, mask, *out["r"],
                                                              pcfg(mb), 0.02, None)),
                       R * (P + N), model_flops(cfg, P, N, R, "score"), read_bytes(cfg, P, N, R, "score", mb, w),
                       plan_gib(mb, False, 1))
        for ckpt in args.checkpointing if scored else []:
            policy.activation_checkpointing = value.backbone.activation_checkpointing = ckpt == "on"
            c = pcfg(mb)
            updated = phase(f"update: {c.ppo_epochs} epochs, step batch {c.step_batch_size}, policy + value fwd+bwd",
                            mb, ckpt, lambda: ppo.ppo_update(policy, value, optimizer, scheduler, out["b"][0], c),
                            c.ppo_epochs * R * (P + N), model_flops(cfg, P, N, R, "update", c.ppo_epochs),
                            read_bytes(cfg, P, N, R, "update", mb, w, c.ppo_epochs), plan_gib(mb, ckpt == "on", 2))
            if updated:
                t = generated[0] + scored[0] + updated[0]
                row("**a whole PPO step**", mb, ckpt, f"**{num(t)}**", R * N / t,
                    sum(model_flops(cfg, P, N, R, ph, c.ppo_epochs) for ph in ("generate", "score", "update")) / t / 1e12,
                    float("nan"), max(generated[1], scored[1], updated[1]), max(plan_gib(mb, ckpt == "on", i) for i in range(3)))
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
        out.pop("b", None)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


def parse_args(argv=None):
    ap = config.Parser(description="Generation and training speed of llama.py on random weights.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="generation batch sizes")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row; the best is reported")
    ap.add_argument("--budget", type=float, default=120.0, help="max estimated seconds of one no-cache run")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--ppo", action="store_true", help="time one PPO step instead (see the docstring)")
    ap.add_argument("--rollout-batch", type=int, default=256, help="--ppo: prompts per rollout (paper: 256)")
    ap.add_argument("--step-batch", type=int, default=128, help="--ppo: samples per optimizer step (paper: 128)")
    ap.add_argument("--micro-batches", type=int, nargs="*", default=[16],
                    help="--ppo: micro-batch sizes to try (none: decoding and generation only)")
    ap.add_argument("--checkpointing", choices=["off", "on"], nargs="+", default=["off"],
                    help="--ppo: activation checkpointing settings to try for each micro-batch size")
    ap.add_argument("--generate-batch", type=int, default=64, help="--ppo: prompts per generate call (paper: 64)")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="--ppo: replay the decoding step as a CUDA graph (CUDA only)")
    args = ap.parse_args(argv)
    return args


def bench_generation(model, args, device):
    """Rows (config, batch, new tokens, seconds, tokens/s, speed-up, cores) of generation at each --batches
    size with and without the KV cache, and the notes that extrapolate a shortened no-cache run."""
    P, N, V = args.prompt_len, args.new_tokens, model.cfg.vocab_size
    rows, notes = [], []
    for B in args.batches:
        prompt = torch.randint(V, (B, P), device=device)
        mask = torch.ones_like(prompt)
        gen = torch.Generator(device=device).manual_seed(0)

        def run(n, use_cache):
            if use_cache:
                generate(model, prompt, mask, n, temperature=1.0, eos_id=None, generator=gen)
            else:
                generate_without_cache(model, prompt, n, gen)

        run(8, True)  # warm-up: allocator, thread pool, kernels
        with torch.no_grad():  # warm-up of the no-cache path and the basis of its time estimate
            t_full, _ = best_time(lambda: model.hidden(torch.randint(V, (B, P + N), device=device)), 1, device)
        n = N
        while n > 8 and t_full * S(n, P) / (P + N) > args.budget:
            n //= 2  # a rough estimate: shorter passes cost less per token in attention, more in overhead
        if n < N:  # the cached run at the full length is cheap: measure it too
            t_cache_N, c = best_time(lambda: run(N, True), args.repeats, device)
            rows.append(("generate, KV cache", B, N, t_cache_N, B * N / t_cache_N, "", c))
        t_cache, c_cache = best_time(lambda: run(n, True), args.repeats, device)
        t_none, c_none = best_time(lambda: run(n, False), args.repeats, device)
        rows.append(("generate, KV cache", B, n, t_cache, B * n / t_cache, "", c_cache))
        rows.append(("generate, no cache", B, n, t_none, B * n / t_none, f"{t_none / t_cache:.1f}x", c_none))
        if n < N:
            est = t_none * S(N, P) / S(n, P)
            notes.append(f"Estimate, not measured: generate, no cache, batch {B}, {N} new tokens would take about "
                         f"{t_none:.3g} s x S({N}) / S({n}) = {est:.3g} s ({B * N / est:.2g} tokens/s, a cache "
                         f"speed-up of about {est / t_cache_N:.0f}x), S(N) = N * {P} + N * (N - 1) / 2 "
                         f"tokens per row (rough: per-step overhead and attention's quadratic cost are ignored).")
    return rows, notes


def bench_training(model, args, device):
    """Rows of forward + backward tokens/s, the full model trainable, then LoRA (add_lora changes the model)."""
    B, T, V = args.train_batch, args.train_len, model.cfg.vocab_size
    rows = []
    tokens = torch.randint(V, (B, T), device=device)
    model.train()

    def step(x):
        logits = model(x)  # (B, T, V) fp32
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    for name in ("full model", "LoRA r=8 on wq,wk,wv,wo"):
        if name.startswith("LoRA"):
            add_lora(model, rank=8, alpha=64, dropout=0.1)
        trainable = count_parameters(model)[0]
        step(tokens[:1])  # warm-up
        t, c = best_time(lambda: step(tokens), args.repeats, device)
        rows.append((f"fwd+bwd, {T}-token rows, {name} ({trainable / 1e6:.2f}M trainable)", B, "-", t, B * T / t, "", c))
    return rows


def main(argv=None):
    """The flags, then one benchmark after another: generation with and without the cache, fwd+bwd; or --ppo."""
    args = parse_args(argv)
    for flag, ok in (("--threads", args.threads is None or args.threads >= 1), ("--repeats", args.repeats >= 1),
                     ("--batches", min(args.batches) >= 1), ("--train-batch", args.train_batch >= 1),
                     ("--train-len", args.train_len >= 2), ("--rollout-batch", args.rollout_batch >= 1),
                     ("--step-batch", args.step_batch >= 1), ("--generate-batch", args.generate_batch >= 1),
                     ("--micro-batches", all(m >= 1 for m in args.micro_batches)),
                     ("--budget", args.budget > 0 and math.isfinite(args.budget))):
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ValueError(f"{flag} must be {'at least 2' if flag == '--train-len' else 'positive'}, got {value}")
    if args.ppo and (args.rollout_batch % args.step_batch or any(args.step_batch % m for m in args.micro_batches)):
        raise ValueError(f"--ppo: --rollout-batch {args.rollout_batch} must be a multiple of --step-batch "
                         f"{args.step_batch}, and that of each of --micro-batches {args.micro_batches}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = plan.get_preset(args.preset)
    if args.prompt_len < 1 or args.new_tokens < 1 or args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} and --new-tokens {args.new_tokens} must be >= 1 and fit "
                         f"the context of {cfg.max_seq_len} tokens of preset {args.preset}")
    if args.ppo:
        return bench_ppo(args, device, dtype)
    torch.manual_seed(0)
    model = Llama(cfg).to(device=device, dtype=dtype).eval()
    P, N = args.prompt_len, args.new_tokens
    print(f"# {hardware(device)}; {args.preset}: {count_parameters(model)[1] / 1e6:.1f}M parameters, "
          f"{str(dtype).removeprefix('torch.')}, best of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    rows, notes = bench_generation(model, args, device)
    rows += bench_training(model, args, device)
    print("\n| config | batch | new tokens | seconds | tokens/s | cache speed-up | CPU cores used |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b, n, t, tps, speedup, cores in rows:
        print(f"| {name} | {b} | {n} | {t:.2f} | {tps:.1f} | {speedup} | {cores:.2f} |")
    for note in notes:
        print(f"\n{note}")
    print(f"\nprompt {P} tokens, temperature 1, top-p 1; total {time.perf_counter() - t_start:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(exits.script(main))
