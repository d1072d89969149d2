"""
The paper's experiment in one flat script: PPO with LoRA on LLaMA (Sun, Gupta & Iyyer 2023, Sec. 3).

    torchrun train.py --estimator js                     # no checkpoints: the built-in small world, on CPU
    torchrun --nproc_per_node=1 train.py --estimator js --policy SFT --reward RM --prompts alpaca.json \
        --devices cuda:0,cuda:1                          # the paper's placement on two GPUs
    python train.py --preset llama-7b --dry-run          # the memory plan, nothing allocated
    torchrun train.py --estimator js --out out/js --resume   # continue from out/js/checkpoint

Placement (paper Sec. 1): with two devices the policy and the value model train on the first, the frozen
reference and reward model sit on the second (bf16 on GPU). With one device the reference is the policy
with its adapters off and the reward model is the value model's backbone with its adapters off: two base
copies instead of four. `torchrun --nproc_per_node=N` runs N data-parallel ranks; each rolls out its share
of the batch and the trainable gradients (LoRA + value head) are all-reduced. Outputs: OUT/metrics.jsonl
(one JSON line per step), OUT/checkpoint (atomic, for --resume), OUT/adapter (the final policy adapter).
"""
import argparse
import copy
import datetime
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import divergences
import llama
import lora
import ppo
from reward import RewardModel, ValueModel

# the paper's settings (../shared/REFERENCE.md); the built-in small world overrides the sizes in WORLD
PAPER = dict(kl_coef=0.02, lora_rank=8, lora_alpha=64, lora_dropout=0.1, rollout_batch_size=256,
             step_batch_size=128, micro_batch_size=16, ppo_epochs=2, lr=1e-5, warmup_steps=5, steps=100,
             max_new_tokens=300, max_prompt_tokens=192, temperature=1.0, top_p=1.0, eval_every=20, save_every=10)
WORLD = dict(PAPER, rollout_batch_size=64, step_batch_size=32, micro_batch_size=32, lr=5e-4, steps=10,
             max_new_tokens=96, max_prompt_tokens=64, eval_every=5, save_every=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PPO with LoRA (Sun et al. 2023).")
    a = p.add_argument
    a("--estimator", default="kl", help=f"divergence penalty D in Eq. 3: {', '.join(divergences.ESTIMATORS)}")
    a("--kl-coef", type=float, help="beta in Eq. 3 (paper 0.02; 0 = no regularization)")
    a("--adaptive-kl", action="store_true", help="AlpacaFarm's adaptive beta controller (off in the paper)")
    a("--policy", help="SFT checkpoint (HF or Meta layout); none of --policy/--reward/--prompts = small world")
    a("--reward", help="reward-model checkpoint (AlpacaFarm layout)")
    a("--prompts", help="JSON list or JSONL of {instruction, input} records")
    a("--eval-prompts", help="held-out prompts (same format); greedy outputs are written as AlpacaEval JSON")
    a("--tokenizer", help="tokenizer.model (default: the one in --policy)")
    a("--lora-rank", type=int), a("--lora-alpha", type=float), a("--lora-dropout", type=float)
    a("--rollout-batch-size", type=int), a("--step-batch-size", type=int), a("--micro-batch-size", type=int)
    a("--ppo-epochs", type=int), a("--lr", type=float), a("--warmup-steps", type=int), a("--steps", type=int)
    a("--max-new-tokens", type=int), a("--max-prompt-tokens", type=int)
    a("--temperature", type=float), a("--top-p", type=float)
    a("--no-eos-penalty", type=float, help="score for responses that never emit EOS (off by default)")
    a("--eval-every", type=int), a("--save-every", type=int)
    a("--devices", help="policy device[,frozen-models device], e.g. cuda:0,cuda:1 (default: GPUs if any, else cpu)")
    a("--out", default="out/run"), a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue from OUT/checkpoint")
    a("--dry-run", action="store_true", help="print the placement and memory plan without allocating")
    a("--preset", help="with --dry-run: a llama.PRESETS name instead of checkpoints (e.g. llama-7b)")
    a("--world-dir", default=".world", help="cache of the built-in small world")
    a("--world-seed", type=int, default=0, help="seed of the small world (its SFT and reward models); PPO seeds "
                                                "vary with --seed, as the paper's three runs on one SFT model")
    args = p.parse_args(argv)
    given = [x is not None for x in (args.policy, args.reward, args.prompts)]
    if any(given) and not all(given):
        raise ValueError("give --policy, --reward and --prompts together, or none of them for the small world")
    args.world = not any(given) and args.preset is None
    for k, v in (WORLD if args.world else PAPER).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    divergences.get_estimator(args.estimator)  # unknown names: one line listing the valid ones
    if args.dry_run and args.world:
        raise ValueError("--dry-run needs --preset NAME (e.g. llama-7b) or --policy/--reward/--prompts")
    if args.preset and not args.dry_run:
        raise ValueError("--preset only plans memory (--dry-run); training needs --policy/--reward/--prompts")
    for flag in ("lora_rank", "steps", "ppo_epochs", "max_new_tokens", "max_prompt_tokens", "eval_every", "save_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    return args


def check_batches(args, world_size):
    per_rank = args.rollout_batch_size // world_size
    for what, n, d in (("--rollout-batch-size", args.rollout_batch_size, world_size),
                       ("--rollout-batch-size", args.rollout_batch_size, args.step_batch_size),
                       ("--step-batch-size", args.step_batch_size, world_size),
                       ("--step-batch-size per rank", args.step_batch_size // world_size, args.micro_batch_size)):
        if n <= 0 or d <= 0 or n % d:
            raise ValueError(f"{what} = {n} is not divisible by {d} (rollout = k x step batch, step batch = "
                             f"ranks x micro-batches x k)")
    return per_rank


def pick_devices(spec, local_rank, local_world):
    if spec:
        devs = spec.split(",")
    elif torch.cuda.is_available():
        per = 2 if torch.cuda.device_count() >= 2 * local_world else 1
        devs = [f"cuda:{local_rank * per + i}" for i in range(per)]
    else:
        devs = ["cpu"]
    if spec and local_rank > 0:  # the pair named is rank 0's; rank r takes the next free pair
        devs = [f"cuda:{int(d.split(':')[1]) + local_rank * len(set(devs))}" if d.startswith("cuda:") else d for d in devs]
    if len(devs) > 2:
        raise ValueError(f"--devices {spec}: give one or two devices")
    for d in devs:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise ValueError(f"--devices: {d!r} is not a device name") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"--devices: {d} does not exist on this machine "
                             f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA devices)")
    return [torch.device(d) for d in devs]


def read_prompts(file):
    if not os.path.exists(file):
        raise FileNotFoundError(f"prompts file {file} does not exist")
    text = open(file).read()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: malformed JSON ({e})") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or \
                not isinstance(r.get("input", ""), (str, type(None))):
            raise ValueError(f"{file}: record {i} needs a string 'instruction' (and optional string 'input')")
    if not records:
        raise ValueError(f"{file}: no records")
    return records


# ----------------------------------------------------------------------------- memory plan (--dry-run)

def dry_run(args, devices):
    gib = lambda n: f"{n / 2**30:8.2f}"
    pcfg = llama.get_preset(args.preset) if args.preset else llama.read_config(args.policy)
    rcfg = pcfg  # AlpacaFarm's reward model has the SFT model's shape; ours carry it in config.json
    if args.reward and not args.preset:
        try:
            rcfg = llama.read_config(args.reward)
        except ValueError:
            pass
    with torch.device("meta"):  # build the real modules, allocate nothing
        policy = llama.Llama(pcfg)
        lora.add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, lora_dtype=torch.float32)
        reward = RewardModel(rcfg)
        value = ValueModel(RewardModel(rcfg).backbone, args.lora_rank, args.lora_alpha, args.lora_dropout,
                           lora_dtype=torch.float32)
    gpu = devices[0].type == "cuda" or args.preset is not None  # a preset plans for GPUs
    wbytes = 2 if gpu else 4  # frozen weights: bf16 on GPU, fp32 on CPU
    frozen = lambda m: sum(p.numel() for p in m.parameters() if not p.requires_grad)
    trainable = sum(lora.count_parameters(m)[0] for m in (policy, value))
    base = frozen(policy)
    print(f"policy LoRA {lora.count_parameters(policy)[0]:,} + value LoRA {lora.count_parameters(value.backbone)[0]:,}"
          f" + value head {value.value_head.weight.numel() + value.value_head.bias.numel()} = {trainable:,} "
          f"trainable, {100 * trainable / base:.3f}% of the {base:,} parameters of the base model")
    train_b = trainable * (4 + 4 + 8)  # fp32 weights, fp32 grads, Adam's two fp32 moments
    base_b = (frozen(policy) + frozen(value)) * wbytes
    names = [str(d) for d in devices] if len(devices) == 2 else (["cuda:0", "cuda:1"] if gpu else ["cpu", "cpu"])
    print(f"{'placement':12s} {'device':8s} {'holds':48s} {'weights':>8s} {'trainable+grads+Adam':>21s}  (GiB)")
    print(f"{'two-device':12s} {names[0]:8s} {'policy + LoRA, value + LoRA + head':48s} {gib(base_b)} {gib(train_b):>21s}")
    print(f"{'':12s} {names[1]:8s} {'reference, reward model':48s} "
          f"{gib((base + sum(p.numel() for p in reward.parameters())) * wbytes)}")
    print(f"{'one-device':12s} {names[0]:8s} {'policy (= reference), value (= reward) + heads':48s} "
          f"{gib(base_b + (rcfg.dim + 1) * wbytes)} {gib(train_b):>21s}")
    # activations: the KV cache of one generation chunk, exactly; for training, saved_bytes_per_token_layer() for
    # each layer and token of both models, plus the policy's fp32 response logits, three copies. 7B, micro-batch 8:
    # 43.3 GiB estimated; on an H100 (bench.py --ppo) the update's peak was 69.2 GiB, 25.2 of them weights.
    T, b, w = args.max_prompt_tokens + args.max_new_tokens, args.micro_batch_size, wbytes
    kv_dim = (pcfg.n_kv_heads or pcfg.n_heads) * (pcfg.dim // pcfg.n_heads)
    kv = 2 * pcfg.n_layers * ppo.PPOConfig.generate_batch_size * T * kv_dim * w
    act = (2 * pcfg.n_layers * b * T * saved_bytes_per_token_layer(pcfg, w)
           + 3 * b * args.max_new_tokens * pcfg.vocab_size * 4)
    print(f"activations: KV cache for {ppo.PPOConfig.generate_batch_size} sequences x {T} tokens {gib(kv).strip()} "
          f"GiB; training micro-batch of {b} x {T} tokens (policy + value) ~{gib(act).strip()} GiB (estimate)")


def saved_bytes_per_token_layer(cfg, w):
    """What autograd keeps per token and layer when training LoRA on wq, wk, wv, wo (frozen projections keep
    no input), w = weight bytes: both RMSNorms' fp32 inputs (8 dim), LoRA dropout's output and 1-byte mask on the
    4 projections (4 (w + 1) dim), SDPA's q, k, v and output (4 w dim; grouped-query k, v are repeated first)
    and SwiGLU's gate, up and silu outputs (3 w hidden_dim). Small terms (rank-8 intermediates, SDPA's
    log-sum-exp) are left out."""
    return 8 * cfg.dim + 4 * (w + 1) * cfg.dim + 4 * w * cfg.dim + 3 * w * cfg.hidden_dim


# ----------------------------------------------------------------------------- checkpoints

def trainable_tensors(policy, value):
    out = {f"policy.{n}": p for n, p in policy.named_parameters() if p.requires_grad}
    out.update({f"value.{n}": p for n, p in value.named_parameters() if p.requires_grad})
    return out


def snapshot(policy, value, optimizer, scheduler, step, pos, kl_coef, generator):
    """Everything a run needs to continue exactly, copied to CPU (also kept in memory to survive a NaN)."""
    return dict(trainable={n: p.detach().cpu().clone() for n, p in trainable_tensors(policy, value).items()},
                optimizer=copy.deepcopy(optimizer.state_dict()), scheduler=scheduler.state_dict(), step=step,
                pos=pos, kl_coef=kl_coef, rng=torch.get_rng_state(), gen_rng=generator.get_state().cpu(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def save_checkpoint(state, out, rank, args, policy):
    """All ranks write their RNG into a temporary directory, rank 0 the rest; then one rename publishes it,
    so a crash leaves either the old checkpoint or the new one, never half of one."""
    final, tmp = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    shared = {k: v for k, v in state.items() if k not in ("rng", "gen_rng", "cuda_rng")}
    torch.save({k: state[k] for k in ("rng", "gen_rng", "cuda_rng")}, os.path.join(tmp, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save(dict(shared, args=vars(args)), os.path.join(tmp, "state.pt"))
        lora.save_adapter(policy, os.path.join(tmp, "policy_adapter"))  # also usable on its own (PEFT layout)
    barrier()
    if rank == 0:
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(out, rank):
    path = os.path.join(out, "checkpoint")
    if not os.path.exists(path) and os.path.exists(path + ".old"):  # a crash between the two renames
        path += ".old"
    for f in ("state.pt", f"rng-rank{rank}.pt"):
        if not os.path.exists(os.path.join(path, f)):
            raise FileNotFoundError(f"--resume: {os.path.join(path, f)} is missing (no checkpoint, or one "
                                    f"written by a run with another number of ranks)")
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    state.update(torch.load(os.path.join(path, f"rng-rank{rank}.pt"), map_location="cpu", weights_only=True))
    return state


# a resumed run must be the same experiment: these flags may not change (--steps, --out, --devices may)
SAME_ON_RESUME = ("estimator", "kl_coef", "adaptive_kl", "policy", "reward", "prompts", "lora_rank", "lora_alpha",
                  "lora_dropout", "rollout_batch_size", "step_batch_size", "micro_batch_size", "ppo_epochs", "lr",
                  "warmup_steps", "max_new_tokens", "max_prompt_tokens", "temperature", "top_p", "seed")


def restore(state, policy, value, optimizer, scheduler, generator):
    params = trainable_tensors(policy, value)
    if set(params) != set(state["trainable"]):
        raise ValueError("--resume: the checkpoint's trainable tensors do not match this run's (LoRA rank or "
                         "targets changed?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    generator.set_state(state["gen_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(policy, ref, reward_model, tokenizer, records, args, dev):
    """Greedy responses to held-out prompts: mean reward score, exact KL to the reference, length."""
    policy.eval()
    texts, score, kl, length = [], [], [], []
    for i in range(0, len(records), args.micro_batch_size):
        batch = records[i:i + args.micro_batch_size]
        tokens, mask = llama.left_pad([tokenizer.encode(llama.alpaca_prompt(r["instruction"], r.get("input") or ""))
                                       for r in batch], tokenizer.pad_id)
        tokens, mask = tokens.to(dev), mask.to(dev)
        out, out_mask, _ = llama.generate(policy, tokens, mask, args.max_new_tokens, temperature=0,
                                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        full, full_mask = torch.cat([tokens, out], 1), torch.cat([mask, out_mask], 1)
        P, fmask = tokens.shape[1], out_mask.float()
        logits = ppo.response_logits(policy, full, full_mask, P, 1.0)
        if ref is None:
            with lora.lora_disabled(policy):
                ref_logits = ppo.response_logits(policy, full, full_mask, P, 1.0)
        else:
            rdev = next(ref.parameters()).device
            ref_logits = ppo.response_logits(ref, full.to(rdev), full_mask.to(rdev), P, 1.0).to(dev)
        kl.append((divergences.kl_true(logits, ref_logits, fmask) * fmask).sum(1))
        rdev = next(reward_model.parameters()).device
        with lora.lora_disabled(reward_model):
            score.append(reward_model(full.to(rdev), full_mask.to(rdev)).float().cpu())
        length.append(fmask.sum(1))
        texts += [tokenizer.decode([t for t, m in zip(o, om) if m]).strip() for o, om in zip(out.tolist(), out_mask.tolist())]
    cat = lambda xs: torch.cat([x.float().cpu() for x in xs])
    stats = dict(eval_score=cat(score).mean().item(), eval_true_kl=cat(kl).mean().item(),
                 eval_length=cat(length).mean().item())
    return texts, stats


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    per_rank = check_batches(args, world_size)
    devices = pick_devices(args.devices, local_rank, local_world)
    if args.dry_run:
        return dry_run(args, devices)
    dev, frozen_dev = devices[0], devices[-1]
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif local_world > 1:  # CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        # generous timeout: rank 0 may build the small world while the others wait at a barrier
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)  # LoRA dropout differs per rank; the LoRA init below is re-seeded

    # 1. data: the built-in small world, or real checkpoints and prompts
    world_eval = None
    if args.world:
        import world
        world_dir = os.path.join(args.world_dir, f"seed{args.world_seed}")
        paths = world.bootstrap(world_dir, seed=args.world_seed, log=log) if rank == 0 else None
        barrier()  # rank 0 built it; the others read the finished directory
        if rank > 0:
            paths = world.bootstrap(world_dir, seed=args.world_seed, log=None)
        args.policy, args.reward, args.prompts = paths["policy"], paths["reward"], paths["prompts"]
        args.eval_prompts, world_eval = paths["eval"], world
    tokenizer = llama.Tokenizer(args.tokenizer or os.path.join(args.policy, "tokenizer.model"))
    records = read_prompts(args.prompts)
    prompts = [tokenizer.encode(llama.alpaca_prompt(r["instruction"], r.get("input") or "")) for r in records]
    kept = [p for p in prompts if len(p) <= args.max_prompt_tokens]
    log(f"prompts: {len(kept)} of {len(prompts)} from {args.prompts} (dropped {len(prompts) - len(kept)} longer "
        f"than {args.max_prompt_tokens} tokens)")
    if not kept:
        raise ValueError(f"{args.prompts}: no prompt fits in --max-prompt-tokens {args.max_prompt_tokens}")
    eval_records = read_prompts(args.eval_prompts) if args.eval_prompts else None

    # 2. models and placement: policy + value train on `dev`; reference + reward model frozen on `frozen_dev`
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lora_kw = dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, lora_dtype=torch.float32)
    torch.manual_seed(args.seed)  # identical LoRA A init on every rank
    policy = llama.Llama.from_pretrained(args.policy, dev, dtype)
    lora.add_lora(policy, **lora_kw)
    if len(devices) == 2:
        ref = llama.Llama.from_pretrained(args.policy, frozen_dev, dtype).requires_grad_(False).eval()
        reward_model = RewardModel.from_pretrained(args.reward, frozen_dev, dtype).requires_grad_(False).eval()
        value = ValueModel.from_reward_model(args.reward, dev, dtype, **lora_kw)
    else:  # reference = policy with adapters off, reward model = value backbone with adapters off
        ref = None
        reward_model = RewardModel.from_pretrained(args.reward, dev, dtype).requires_grad_(False).eval()
        value = ValueModel(reward_model.backbone, **lora_kw)
    if args.max_prompt_tokens + args.max_new_tokens > policy.cfg.max_seq_len:
        raise ValueError(f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens {args.max_new_tokens} "
                         f"exceed the policy's context of {policy.cfg.max_seq_len} tokens")
    torch.manual_seed(args.seed + rank)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    log(f"devices: policy + value on {dev}, reference + reward model on {frozen_dev}"
        + ("" if len(devices) == 2 else " (reference = policy with adapters off, reward = value backbone with "
           "adapters off)") + f"; {dtype}; {world_size} rank(s)")
    log(f"trainable: {n_train:,} (policy LoRA {lora.count_parameters(policy)[0]:,}, value LoRA + head "
        f"{n_train - lora.count_parameters(policy)[0]:,}) of {lora.count_parameters(policy)[1]:,} policy parameters")
    if world_size > 1:  # every rank must start from identical trainable weights
        for p in params:
            dist.broadcast(p.data, 0)

    # 3. optimizer: AdamW, warm-up over the first PPO steps then linear decay to 0 (REFERENCE.md)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.0)
    schedule = lambda s: min((s + 1) / max(1, args.warmup_steps), max(0.0, (args.steps - s) / max(1, args.steps - args.warmup_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    cfg = ppo.PPOConfig(kl_coef=args.kl_coef, estimator=args.estimator, adaptive_kl=args.adaptive_kl,
                        no_eos_penalty=args.no_eos_penalty, ppo_epochs=args.ppo_epochs,
                        rollout_batch_size=per_rank, step_batch_size=args.step_batch_size // world_size,
                        micro_batch_size=args.micro_batch_size, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p)
    generator = torch.Generator(dev).manual_seed(1000 * args.seed + rank)

    def sync_grads():  # mean of the ranks' gradients, so every rank takes the same optimizer step
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world_size

    def mean_over_ranks(stats):
        if world_size == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return {k: v / world_size for k, v in zip(keys, t.tolist())}

    # 4. resume
    step, pos, kl_coef = 0, 0, args.kl_coef
    os.makedirs(args.out, exist_ok=True)
    metrics_file = os.path.join(args.out, "metrics.jsonl")
    if args.resume:
        state = load_checkpoint(args.out, rank)
        changed = [f"--{k.replace('_', '-')} {state['args'].get(k)} -> {getattr(args, k)}" for k in SAME_ON_RESUME
                   if state["args"].get(k) != getattr(args, k)]
        if changed:
            raise ValueError(f"--resume: {args.out}/checkpoint was written with other settings: {'; '.join(changed)}")
        restore(state, policy, value, optimizer, scheduler, generator)
        step, pos, kl_coef = state["step"], state["pos"], state["kl_coef"]
        if rank == 0 and os.path.exists(metrics_file):  # drop lines logged after the checkpoint
            lines = [l for l in open(metrics_file) if l.endswith("\n") and json.loads(l)["step"] <= step]
            with open(metrics_file + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(metrics_file + ".tmp", metrics_file)
        log(f"resumed from {args.out}/checkpoint at step {step}")
    elif rank == 0:  # a new run never overwrites an earlier one in OUT: its files move to OUT/previous-N
        ours = [f for f in ("metrics.jsonl", "checkpoint", "checkpoint.old", "adapter", "eval")
                if os.path.exists(os.path.join(args.out, f))]
        if ours:
            n = 1
            while os.path.exists(os.path.join(args.out, f"previous-{n}")):
                n += 1
            old = os.path.join(args.out, f"previous-{n}")
            os.makedirs(old)
            for f in ours:
                os.replace(os.path.join(args.out, f), os.path.join(old, f))
            log(f"moved the earlier run in {args.out} ({', '.join(ours)}) to {old} "
                f"(`--out {old} --resume` would continue it)")

    def run_eval(step):  # held-out greedy outputs -> stats, and AlpacaEval JSON in OUT/eval/
        texts, estats = evaluate(policy, ref, reward_model, tokenizer, eval_records, args, dev)
        if world_eval is not None:  # the simulated annotator: win rate against the reference outputs
            estats["eval_win_rate"], estats["eval_win_rate_se"] = world_eval.win_rate(
                eval_records, texts, [r["output"] for r in eval_records])
            estats["eval_accuracy"] = sum(world_eval.check(r, t) for r, t in zip(eval_records, texts)) / len(texts)
        if rank == 0:
            os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
            file = os.path.join(args.out, "eval", f"step{step:04d}.json")
            with open(file + ".tmp", "w") as f:
                json.dump([{"instruction": r["instruction"], "input": r.get("input") or "", "output": t,
                            "generator": f"lora-rlhf-{args.estimator}-step{step}"} for r, t in zip(eval_records, texts)], f, indent=1)
            os.replace(file + ".tmp", file)
        return estats

    def order(epoch):  # a fresh shuffle of the prompts per pass, reproducible from the seed
        return torch.randperm(len(kept), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch)).tolist()

    # 5. the PPO loop
    log(f"PPO: {args.steps} steps x {args.rollout_batch_size} rollouts, step batch {args.step_batch_size}, "
        f"micro-batch {args.micro_batch_size}, estimator {args.estimator}, beta {kl_coef}")
    if eval_records and step == 0:  # the SFT policy, as the baseline of every curve
        estats = run_eval(0)
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": 0, **estats}) + "\n")
        log("step    0 (SFT) | " + " | ".join(f"{k[5:]} {v:.3f}" for k, v in estats.items()))
    while step < args.steps:
        good = snapshot(policy, value, optimizer, scheduler, step, pos, kl_coef, generator)
        t0 = time.time()
        idx = [pos + rank * per_rank + i for i in range(per_rank)]
        batch_prompts = [kept[order(i // len(kept))[i % len(kept)]] for i in idx]
        pos += args.rollout_batch_size
        tokens, mask = llama.left_pad(batch_prompts, tokenizer.pad_id)
        batch, rstats = ppo.rollout(policy, value, reward_model, tokens.to(dev), mask.to(dev), cfg, kl_coef,
                                    tokenizer.eos_id, tokenizer.pad_id, ref_model=ref, generator=generator)
        t1 = time.time()
        try:
            ustats = ppo.ppo_update(policy, value, optimizer, scheduler, batch, cfg,
                                    sync_grads if world_size > 1 else None, generator=None)
            if not all(torch.isfinite(p).all() for p in params):
                raise FloatingPointError(f"ppo_update: trainable weights are not finite after the update")
        except FloatingPointError as e:  # restore the weights of the last finished step and save them
            restore(good, policy, value, optimizer, scheduler, generator)
            save_checkpoint(good, args.out, rank, args, policy)
            raise FloatingPointError(f"{e}; stopped at PPO step {step + 1}, the checkpoint of step {step} is in "
                                     f"{args.out}/checkpoint (--resume continues from it)") from None
        t2 = time.time()
        step += 1
        stats = mean_over_ranks({**rstats, **ustats, "time_rollout": t1 - t0, "time_train": t2 - t1,
                                 "tokens_per_s": batch["mask"].sum().item() * world_size / (t2 - t0)})
        if args.adaptive_kl:
            kl_coef = ppo.update_kl_coef(kl_coef, stats["penalty_seq"], cfg)
        if eval_records and (step % args.eval_every == 0 or step == args.steps):
            stats.update(run_eval(step))
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": step, **stats}) + "\n")
        log(f"step {step:4d}/{args.steps} | score {stats['score']:+.3f} | penalty {stats['penalty']:+.4f} | "
            f"true KL {stats['true_kl']:.3f} | len {stats['response_length']:.1f} | loss {stats['loss']:+.4f} | "
            f"{stats['tokens_per_s']:.0f} tok/s | {t2 - t0:.1f}s"
            + "".join(f" | {k[5:]} {v:.3f}" for k, v in stats.items() if k.startswith("eval_")))
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(snapshot(policy, value, optimizer, scheduler, step, pos, kl_coef, generator),
                            args.out, rank, args, policy)
    print(f"trainable checksum {sum(p.double().sum().item() for p in params):.12e} (rank {rank})", flush=True)
    if rank == 0:
        lora.save_adapter(policy, os.path.join(args.out, "adapter"), base_model_name_or_path=args.policy)
        log(f"done: adapter in {args.out}/adapter, metrics in {metrics_file}")
    if dist.is_initialized():
        dist.destroy_process_group()


def cli(argv=None):
    """main(), with bad input and the known failures ending in one line on stderr and exit status 1."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; a smaller --micro-batch-size lowers it and changes nothing else (gradients "
              "are accumulated up to --step-batch-size), as does a smaller --max-new-tokens; --dry-run estimates it",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
