r"""
The paper's experiment in one flat script: PPO with LoRA on LLaMA (Sun, Gupta & Iyyer 2023, Sec. 3).

    torchrun train.py --estimator js                     # no checkpoints: the built-in small world, on CPU
    torchrun train.py --estimator js --policy SFT --reward RM --prompts alpaca.json \
        --devices cuda:0,cuda:1                          # the paper's placement on two GPUs
    python train.py --preset llama-7b --dry-run          # the memory plan, nothing allocated
    torchrun train.py --estimator js --out out/js --resume   # continue from out/js/checkpoint

Placement (paper Sec. 1) is in load_models: two devices as the paper, or one holding two base copies instead
of four. `torchrun --nproc_per_node=N` runs N data-parallel ranks; each rolls out its share of the batch and
the trainable gradients (LoRA + value head) are all-reduced. Outputs: OUT/metrics.jsonl (a line per step),
OUT/checkpoint (for --resume), OUT/adapter (the final policy adapter, PEFT layout), OUT/eval (responses).
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130, as later in the run

import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist

import checkpoints
import llama
import lora
import ppo
from reward import ValueModel
from support import config, data, exits, plan, report, rundir


@dataclasses.dataclass
class Args:
    """Every knob of a run, with the paper's default: one field each, its one-line doc under it (shown by --help).
    The ranges they may take are support/config.py's RANGES; presets are dataclasses.replace of Args()."""
    # Eq. 3: per-token reward r_t = -kl_coef * D_t, plus the reward-model score at the last token
    kl_coef: float = 0.02
    """beta in Eq. 3 (0 = no regularization)"""
    estimator: str = "kl"
    """the divergence penalty D in Eq. 3: kl, clamped_kl, bregman, squared, js, js_unbiased, none, negative_kl"""
    adaptive_kl: bool = False
    """AlpacaFarm's adaptive beta controller (off in the paper)"""
    kl_target: float = 6.0
    """target of the per-sequence penalty sum (adaptive controller only)"""
    k_beta: float = 0.1
    """controller gain: beta *= 1 + k_beta * clip(KL / target - 1, -0.2, 0.2)"""
    no_eos_penalty: float | None = None
    """score given to responses that never emit EOS (e.g. -1; off)"""
    whiten_rewards: bool = True
    """scale shaped rewards by their std, keeping the mean (as AlpacaFarm)"""
    # GAE (Schulman et al. 2016)
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda (upstream AlpacaFarm: 1.0)"""
    # Eq. 2 and the value loss
    cliprange: float = 0.2
    """epsilon of the clipped ratio in Eq. 2"""
    cliprange_value: float = 0.2
    """clip range of the value loss"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    # optimization phase
    ppo_epochs: int = 2
    """passes over each rollout"""
    step_batch_size: int = 128
    """samples per optimizer step"""
    micro_batch_size: int = 16
    """samples per forward/backward (gradients accumulate to the step batch)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, joint over policy + value"""
    # rollout generation
    max_new_tokens: int = 300
    """response length limit"""
    temperature: float = 1.0
    """sampling temperature of rollouts"""
    top_p: float = 1.0
    """nucleus sampling mass of rollouts"""
    generate_batch_size: int = 64
    """prompts per generate call, in rollouts and evaluations (decoding is memory-light)"""
    cuda_graph: bool = True
    """on a CUDA device, replay each decoding step of the rollouts as a CUDA graph"""
    # models and data
    policy: str | None = None
    """SFT checkpoint (Hugging Face or Meta layout); without --policy, --reward and --prompts the built-in small
    world is built and used"""
    reward: str | None = None
    """reward-model checkpoint (AlpacaFarm layout)"""
    prompts: str | None = None
    """PPO prompts: a JSON list or JSONL of {instruction, input} records"""
    eval_prompts: str | None = None
    """held-out prompts; greedy outputs are written as AlpacaEval JSON"""
    tokenizer: str | None = None
    """tokenizer.model (default: the one in --policy)"""
    max_prompt_tokens: int = 192
    """longer prompts are dropped, as in AlpacaFarm"""
    # LoRA (Eq. 1) and the optimizer
    finetune: str = "lora"
    """what PPO trains: lora (adapters on the SFT and reward models, Eq. 1) or full (every weight, in fp32)"""
    lora_rank: int = 8
    """k in Eq. 1, for the policy and the value model"""
    lora_alpha: float = 64.0
    """alpha in Eq. 1 (the LoRA update is scaled by alpha / k)"""
    lora_dropout: float = 0.1
    """dropout on the LoRA path"""
    lora_targets: str = "wq,wk,wv,wo"
    """projections LoRA adapts in every layer (the paper's), or "all": also w1,w2,w3, as "LoRA Without Regret" """
    lr: float = 1e-5
    """AdamW learning rate (betas 0.9, 0.999, eps 1e-5, no weight decay)"""
    warmup_steps: int = 5
    """linear warm-up from lr / warmup_steps over these PPO steps, then linear decay to 0 at --decay-steps"""
    decay_steps: int | None = 780
    """the step at which the decayed lr reaches 0: the paper's whole configured schedule, 10 epochs x ~20k prompts
    / 256, of which it ran 100 (None: --steps)"""
    # the run
    steps: int = 100
    """PPO steps"""
    rollout_batch_size: int = 256
    """prompts rolled out per PPO step, over all ranks"""
    eval_every: int = 20
    """evaluate on --eval-prompts every this many steps"""
    save_every: int = 10
    """write OUT/checkpoint every this many steps"""
    devices: str | None = None
    """policy device[,frozen-models device], e.g. cuda:0,cuda:1 (default: GPUs, else cpu)"""
    out: str = "out/run"
    """output directory"""
    seed: int = 0
    """PPO seed (sampling, dropout, LoRA init)"""
    resume: bool = False
    """continue from OUT/checkpoint"""
    dry_run: bool = False
    """print the placement and memory plan without allocating"""
    preset: str | None = None
    """with --dry-run: a llama.PRESETS name instead of checkpoints (e.g. llama-7b)"""
    world_dir: str = ".world"
    """where the built-in small world is built"""
    world_seed: int = 0
    """the small world's seed (its SFT and reward models); PPO seeds vary with --seed, as the paper's three runs
    share one SFT model"""
    activation_checkpointing: bool | None = None
    """recompute each block in backward instead of keeping its activations (default: on where the plan says the
    update would not fit the CUDA device without it)"""


# the built-in small world: small batches, a higher lr, room to grow past ~75 tokens, its 500 eval prompts in one batch
WORLD = dataclasses.replace(Args(), rollout_batch_size=64, step_batch_size=32, micro_batch_size=32, lr=5e-4, steps=10,
                            decay_steps=None, max_new_tokens=96, max_prompt_tokens=64, eval_every=5,
                            generate_batch_size=512)
# a resumed run must be the same experiment: every flag but these must match the checkpoint's
MAY_CHANGE_ON_RESUME = ("steps", "out", "devices", "resume", "eval_every", "save_every", "activation_checkpointing",
                        "cuda_graph")


# ----------------------------------------------------------------------------- the loop's helpers

def lr_schedule(args):
    # linear warm-up from lr / warmup_steps (the first step is not wasted), then linear decay to 0 at --decay-steps
    # (the paper's fork decays over its whole configured schedule: at step 100 of 780 the rate is still 0.88 lr), or
    # at --steps
    end = args.decay_steps or args.steps
    return lambda s: min((s + 1) / max(1, args.warmup_steps), max(0.0, (end - s) / max(1, end - args.warmup_steps)))


# ----------------------------------------------------------------------------- set-up, in main's order

def load_models(args, devices, log):
    """(policy, value, reference, reward model, trainable parameters): policy + value train on devices[0] (LoRA on
    both); reference + reward model frozen on devices[-1]; bf16 on GPU. With one device the reference is None
    (the policy with its adapters off) and the reward model is the value model's backbone with its adapters off.
    --finetune full: policy and value train every weight (fp32), and the reference and reward model are copies."""
    dev, dtype = devices[0], torch.bfloat16 if devices[0].type == "cuda" else torch.float32
    full = args.finetune == "full"
    lora_kw = dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, lora_dtype=torch.float32,
                   targets=config.parse_targets(args.lora_targets))
    frozen = lambda m: m.requires_grad_(False).eval()
    policy = checkpoints.load_llama(args.policy, dev, torch.float32 if full else dtype)
    if not full:
        lora.add_lora(policy, **lora_kw)
    if len(devices) == 2 or full:  # a fully fine-tuned policy keeps no copy of the SFT weights: the reference is one
        ref = frozen(checkpoints.load_llama(args.policy, devices[-1], dtype))
        reward_model = frozen(checkpoints.load_reward_model(args.reward, devices[-1], dtype))
        value = ValueModel(checkpoints.load_reward_model(args.reward, dev, policy.output.weight.dtype).backbone,
                           **lora_kw, full=full)
    else:
        ref, reward_model = None, frozen(checkpoints.load_reward_model(args.reward, dev, dtype))
        value = ValueModel(reward_model.backbone, **lora_kw)
    policy.activation_checkpointing = value.backbone.activation_checkpointing = plan.use_checkpointing(args, dev)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    report.placement(devices, policy, ref, params, log)  # devices, dtype, ranks, checkpointing, trainable counts
    for p in params if dist.is_initialized() else ():  # every rank starts from identical trainable weights
        dist.broadcast(p.data, 0)
    return policy, value, ref, reward_model, params


# ----------------------------------------------------------------------------- main

def main(argv=None):
    """The run, top to bottom, in eight numbered sections, as CleanRL's ppo.py: 1-2 here, then train (3-8); set-up
    and bookkeeping (resume, checkpoints, the stop after a NaN or a signal) are called from them in one line each."""
    # 1. config: the flags (Args)
    args, small_world = config.parse(Args, WORLD, argv)

    # 2. ranks and devices; OUT is claimed before any work (a bad --out, or another run writing there, ends here)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    per_rank = plan.check_batches(args, world_size)
    devices = plan.pick_devices(args.devices, local_rank, local_world)
    if args.dry_run:
        return plan.print_plan(args, devices)
    log = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0 and (note := rundir.claim(args.out)):
        log(note)
    rundir.init_ranks(devices, world_size, local_world)
    train(args, small_world, devices, rank, world_size, per_rank, log)


def train(args, small_world, devices, rank, world_size, per_rank, log):
    """main's sections 3-8: data, models, optimizer, resume, the PPO loop and the final adapter, on this rank."""
    dev = devices[0]
    # 3. data: the built-in small world, or real checkpoints and prompts
    args, world = data.small_world(args, rank, log) if small_world else (args, None)
    tokenizer, prompts, eval_records = data.read(args, log)

    # 4. models: policy, value (LoRA), reference, reward model
    torch.manual_seed(args.seed)  # identical LoRA A init on every rank
    policy, value, ref, reward_model, params = load_models(args, devices, log)
    torch.manual_seed(args.seed + rank)  # LoRA dropout and the update's shuffles differ per rank
    generator = torch.Generator(dev).manual_seed(1000 * args.seed + rank)  # sampling, per rank

    # 5. optimizer: AdamW, warm-up then linear decay (lr_schedule); gradients averaged over the ranks
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(args))
    rank_args = dataclasses.replace(args, step_batch_size=args.step_batch_size // world_size)  # ppo.py's, per rank
    sync = (lambda: rundir.sync_grads(params, world_size)) if world_size > 1 else None

    # 6. resume, or start without overwriting an earlier run's files; the SFT policy's evaluation is step 0
    flags = dataclasses.asdict(args)
    step, pos, kl_coef = rundir.start(flags, rank, MAY_CHANGE_ON_RESUME, log, policy, value, optimizer, scheduler,
                                      generator)
    log(f"PPO: {args.steps} steps x {args.rollout_batch_size} rollouts, step batch {args.step_batch_size}, "
        f"micro-batch {args.micro_batch_size}, estimator {args.estimator}, beta {kl_coef}")
    models = (policy, ref, reward_model)
    if eval_records and step == 0:  # the baseline of every curve
        report.record(0, {}, args, rank, log, models, tokenizer, eval_records, world)

    # 7. the PPO loop (ppo.py's steps 1-5); a NaN, Ctrl-C or SIGTERM stops it with the last finished step saved
    good = rundir.snapshot(policy, value, optimizer, scheduler, step, pos, kl_coef, generator)  # last finished step
    try:
        while step < args.steps:
            t0 = time.time()
            batch_p = data.batch(prompts, pos + rank * per_rank, per_rank, args.seed)  # this rank's share
            tokens, mask = (x.to(dev) for x in llama.left_pad(batch_p, tokenizer.pad_id))
            responses, rmask = ppo.generate_responses(policy, tokens, mask, rank_args, tokenizer.eos_id,
                                                      tokenizer.pad_id, generator)          # 1a. sample y ~ pi
            t1 = time.time()
            batch, stats = ppo.score_rollout(policy, value, reward_model, tokens, mask, responses, rmask, rank_args,
                                             kl_coef, tokenizer.eos_id, ref_model=ref)  # 1b-d score, 2-3. Eq. 3, GAE
            t2 = time.time()
            stats.update(ppo.ppo_update(policy, value, optimizer, scheduler, batch, rank_args, sync))  # 4-5. Eq. 2
            t3 = time.time()
            step, pos = step + 1, pos + args.rollout_batch_size
            stats.update(time_rollout=t2 - t0, time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2,
                         tokens_per_s=batch["mask"].sum().item() * world_size / (t3 - t0))
            stats = rundir.mean_over_ranks(stats, world_size, dev)
            kl_coef = ppo.update_kl_coef(kl_coef, stats["penalty_seq"], rank_args)
            report.record(step, stats, args, rank, log, models, tokenizer, eval_records, world)  # eval, metrics
            good = rundir.snapshot(policy, value, optimizer, scheduler, step, pos, kl_coef, generator)
            if step % args.save_every == 0 or step == args.steps:
                rundir.save_checkpoint(good, flags, args.out, rank, policy)
            if world_size > 1 and rundir.interrupted(dev):  # several ranks stop together, here
                raise rundir.Interrupted("signal")
    except (FloatingPointError, rundir.Interrupted) as e:
        rundir.stop(e, good, flags, rank, policy, value, optimizer, scheduler, generator)

    # 8. the final adapter
    report.finish(args, rank, params, policy, log)


def cli(argv=None):
    """main(), with bad input and the known failures ending in one line on stderr (support/exits.py)."""
    return exits.one_line(main, argv)


if __name__ == "__main__":
    rundir.stop_on_signals()
    sys.exit(cli())
