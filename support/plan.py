"""
Where a run's models go and what memory they need. Placement: one or two devices per rank (the paper's two:
policy + value training on the first, the frozen reference + reward model on the second) and the batch sizes
split over ranks. The memory plan (`train.py --dry-run`): the real models built on PyTorch's meta device, so their
parameters are counted exactly and nothing is allocated; activations estimated from what autograd keeps.
The peak of a device is its weights and trainable state plus the largest of the step's three phases
(generate, score, update), for each micro-batch size with and without activation checkpointing.

    python train.py --preset llama-7b --dry-run
"""
import torch

import checkpoints
import llama
import lora
from reward import RewardModel, ValueModel
from support import config


# ----------------------------------------------------------------------------- placement

def get_preset(name):
    """llama.PRESETS[name], for --preset (the dry run here, tools/bench.py); an unknown name is refused."""
    if name not in llama.PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(llama.PRESETS)}")
    return llama.PRESETS[name]


def check_batches(args, world_size):
    """Prompts per rank; the batch sizes must nest: rollout = k x step batch, step batch = ranks x micro-batches x k."""
    for what, n, d in (("--rollout-batch-size", args.rollout_batch_size, world_size),
                       ("--rollout-batch-size", args.rollout_batch_size, args.step_batch_size),
                       ("--step-batch-size", args.step_batch_size, world_size),
                       ("--step-batch-size per rank", args.step_batch_size // world_size, args.micro_batch_size)):
        if n % d:
            hint = f"; e.g. --micro-batch-size {n}" if what.endswith("per rank") and n > 0 else ""
            raise ValueError(f"{what} = {n} is not divisible by {d} (rollout = k x step batch, step batch = "
                             f"ranks x micro-batches x k){hint}")
    return args.rollout_batch_size // world_size


def check_context(args, cfg):
    """A prompt of --max-prompt-tokens and its response of --max-new-tokens must fit the policy's context."""
    if args.max_prompt_tokens + args.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens {args.max_new_tokens} "
                         f"exceed the policy's context of {cfg.max_seq_len} tokens")


def pick_devices(spec, local_rank, local_world):
    """--devices as one or two torch devices for this rank (default: two GPUs per rank if there are enough, else
    one, else the CPU); a device that does not exist is one line naming it."""
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec is not None:
        devs = spec.split(",")
    elif n_cuda:
        per = 2 if n_cuda >= 2 * local_world else 1
        devs = [f"cuda:{local_rank * per + i}" for i in range(per)]
    else:
        devs = ["cpu"]
    if not 1 <= len(devs) <= 2:
        raise ValueError(f"--devices {spec!r}: give one or two devices")
    parsed = []
    for d in devs:
        try:
            parsed.append(torch.device(d))
        except RuntimeError:
            raise ValueError(f"--devices: {d!r} is not a device name") from None
        if parsed[-1].type not in ("cpu", "cuda"):
            raise ValueError(f"--devices: {d} is not supported (cpu or cuda:N)")
    gpus = [d.index or 0 for d in parsed if d.type == "cuda"]
    if spec is not None and local_rank > 0 and gpus:  # the GPUs named are rank 0's; rank r takes the next span
        shift = local_rank * (max(gpus) - min(gpus) + 1)
        parsed = [torch.device("cuda", (d.index or 0) + shift) if d.type == "cuda" else d for d in parsed]
    for d in parsed:
        if d.type == "cuda" and (d.index or 0) >= n_cuda:
            why = (f"; it is local rank {local_rank}'s share of --devices {spec}" if spec and local_rank else
                   f"; by default each of the {local_world} local ranks takes its own GPU" if local_rank else "")
            raise ValueError(f"--devices: {d} does not exist on this machine ({n_cuda} CUDA devices){why}")
    return parsed


# ----------------------------------------------------------------------------- memory

def saved_bytes_per_token_layer(cfg, w, checkpointing=False, targets=("wq", "wk", "wv", "wo"), full=False):
    """What autograd keeps per token and layer, w = weight bytes. Training LoRA on `targets` (frozen projections keep
    no input): both RMSNorms' fp32 inputs (8 dim), LoRA dropout's output and 1-byte mask on each target's input
    ((w + 1) dim, or hidden_dim for w2), SDPA's q, k, v and output (4 w dim; grouped-query k, v are repeated
    first) and SwiGLU's gate, up and silu outputs (3 w hidden_dim). full (every weight trains): both RMSNorms'
    fp32 input, normalized input and output (2 (4 + 2 w) dim: the norm's gain trains), SDPA's four (4 w dim) and
    SwiGLU's gate, silu, up and their product, w2's input (4 w hidden_dim). Small terms (rank-k intermediates, SDPA's
    log-sum-exp and float mask) are left out. With activation checkpointing a block keeps only its input (w dim);
    backward recomputes the rest of one block at a time."""
    if checkpointing:
        return w * cfg.dim
    if full:
        return 2 * (4 + 2 * w) * cfg.dim + 4 * w * cfg.dim + 4 * w * cfg.hidden_dim
    lora_inputs = sum(cfg.hidden_dim if t == "w2" else cfg.dim for t in targets)
    return 8 * cfg.dim + (w + 1) * lora_inputs + 4 * w * cfg.dim + 3 * w * cfg.hidden_dim


def phase_bytes(cfg, args, w, micro_batch, checkpointing):
    """Bytes the three phases add on the training device on top of the weights and trainable state."""
    P, N, G, b, V = args.max_prompt_tokens, args.max_new_tokens, args.generate_batch_size, micro_batch, cfg.vocab_size
    T = P + N
    head = cfg.vocab_size * cfg.dim * 4 if w != 4 else 0  # the fp32 copy of the LM head (ppo.response_logits)
    block = lambda rows: rows * (2 * cfg.dim + 3 * cfg.hidden_dim) * w  # a forward's widest moment, no autograd
    # generate: the static KV cache of one chunk (prompt + every new token), while the prompt goes through
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
    generate = 2 * cfg.n_layers * G * T * kv_dim * w + block(G * P)
    # score: the policy's and reference's fp32 logits (b, N, V) and the entropy's three (ppo.policy_and_reference)
    score = 5 * b * N * V * 4 + head + block(b * T)
    # update: what autograd keeps in both models (policy, value), one block recomputed when checkpointing,
    # the policy's fp32 logits, their gradient and the log-softmax's
    kept = lambda ckpt: saved_bytes_per_token_layer(cfg, w, ckpt, config.parse_targets(args.lora_targets),
                                                    args.finetune == "full")
    update = (2 * cfg.n_layers * b * T * kept(checkpointing) + checkpointing * b * T * kept(False)
              + 3 * b * N * V * 4 + head)
    return generate, score, update


def micro_batches(args):
    return sorted({m for m in (args.micro_batch_size // 2, args.micro_batch_size, 2 * args.micro_batch_size)
                   if 1 <= m <= args.step_batch_size})


def build(args):
    """(policy config, reward config, parameter counts): the real modules built on the meta device and counted once."""
    pcfg = get_preset(args.preset) if args.preset else checkpoints.read_config(args.policy)
    rcfg = pcfg  # AlpacaFarm's reward model has the SFT model's shape; ours carry it in config.json
    if args.reward and not args.preset:
        try:
            rcfg = checkpoints.read_config(args.reward)
        except ValueError:
            pass
    full, targets = args.finetune == "full", config.parse_targets(args.lora_targets)
    with torch.device("meta"):  # build the real modules, allocate nothing
        policy = llama.Llama(pcfg)
        if not full:
            lora.add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, lora_dtype=torch.float32)
        reward = RewardModel(rcfg)
        value = ValueModel(RewardModel(rcfg).backbone, args.lora_rank, args.lora_alpha, args.lora_dropout,
                           lora_dtype=torch.float32, targets=targets, full=full)
    frozen = lambda m: sum(p.numel() for p in m.parameters() if not p.requires_grad)
    # policy_lora, value_lora: what trains of each (with --finetune full: every weight but the value's unused head)
    n = dict(policy_lora=lora.count_parameters(policy)[0], value_lora=lora.count_parameters(value.backbone)[0],
             value_head=value.value_head.weight.numel() + value.value_head.bias.numel(), base=frozen(policy),
             value_frozen=frozen(value), reward=sum(p.numel() for p in reward.parameters()),
             sft=frozen(policy) + full * lora.count_parameters(policy)[0])  # the SFT model's (= the reference's)
    n["trainable"] = n["policy_lora"] + n["value_lora"] + n["value_head"]
    return pcfg, rcfg, n


def training_weights(n, rcfg, w, full=False):
    """Bytes on the one device before any activation: the frozen policy and value (w bytes a weight), the reward
    head, and the trainable parameters in fp32 with their gradients and Adam's two moments (16 bytes). full: the
    value model's unused LM head (fp32), the reference and reward model (w), and every trainable weight (16)."""
    if full:
        return n["value_frozen"] * 4 + (n["sft"] + n["reward"]) * w + n["trainable"] * 16
    return (n["base"] + n["value_frozen"] + rcfg.dim + 1) * w + n["trainable"] * 16


def training_device_peak(args, checkpointing, w=2):
    """The planned peak bytes of the training device (either placement) at args.micro_batch_size: what
    use_checkpointing (below) compares with the device's memory to decide on activation checkpointing."""
    pcfg, rcfg, n = build(args)
    full = args.finetune == "full"  # (then the one-device figure: the reference and reward model counted too)
    return training_weights(n, rcfg, w, full) + max(phase_bytes(pcfg, args, 4 if full else w, args.micro_batch_size,
                                                                checkpointing))


def print_plan(args, devices):
    gib = lambda n: f"{n / 2**30:8.2f}"
    pcfg, rcfg, n = build(args)
    gpu = devices[0].type == "cuda" or args.preset is not None  # a preset plans for GPUs
    wbytes = 2 if gpu else 4  # frozen weights: bf16 on GPU, fp32 on CPU
    full, trainable, base = args.finetune == "full", n["trainable"], n["base"]
    train_b = trainable * (4 + 4 + 8)  # fp32 weights, fp32 grads, Adam's two fp32 moments
    if full:  # the trainable models in fp32; the reference a frozen copy of the SFT model, beside the reward model
        print(f"trainable: policy {n['policy_lora']:,} + value model {n['value_lora']:,} + value head "
              f"{n['value_head']:,} = {trainable:,}\n           every weight, in fp32 (--finetune full)")
        base_b, frozen_b = n["value_frozen"] * 4, (n["sft"] + n["reward"]) * wbytes
        holds, one_holds = "policy, value + head (all train)", "policy, value, reference, reward"
    else:
        print(f"trainable: policy LoRA {n['policy_lora']:,} + value LoRA {n['value_lora']:,} + value head "
              f"{n['value_head']:,} = {trainable:,}\n"
              f"           {100 * trainable / base:.3f}% of the {base:,} parameters of the base model")
        base_b, frozen_b = (base + n["value_frozen"]) * wbytes, (base + n["reward"]) * wbytes
        holds, one_holds = "policy + LoRA, value + LoRA + head", "policy = reference, value = reward, heads"
    one_b = training_weights(n, rcfg, wbytes, full) - train_b
    names = [str(d) for d in devices] if len(devices) == 2 else (["cuda:0", "cuda:1"] if gpu else ["cpu", "cpu"])
    print(f"{'placement':12s} {'device':8s} {'holds':42s} {'weights':>8s} {'trainable+grads+Adam':>21s}  GiB")
    print(f"{'two-device':12s} {names[0]:8s} {holds:42s} {gib(base_b)} {gib(train_b):>21s}")
    print(f"{'':12s} {names[1]:8s} {'reference, reward model':42s} {gib(frozen_b)}")
    print(f"{'one-device':12s} {names[0]:8s} {one_holds:42s} {gib(one_b)} {gib(train_b):>21s}")
    T = args.max_prompt_tokens + args.max_new_tokens
    print(f"\npeak per device (GiB, estimate) = weights + trainable state + the largest phase of three:\n"
          f"generate (KV cache of {args.generate_batch_size} x {T} tokens), score, update (micro-batch x {T} tokens, "
          f"policy + value)")
    print(f"{'placement':12s} {'device':8s} {'micro-batch':>11s} {'checkpointing':>13s} {'generate':>8s} "
          f"{'score':>8s} {'update':>8s} {'peak':>8s}")
    weights = training_weights(n, rcfg, wbytes, full)
    for mb in micro_batches(args):
        for ckpt in (False, True):
            phases = phase_bytes(pcfg, args, 4 if full else wbytes, mb, ckpt)  # (fully trained models are fp32)
            print(f"{'one-device':12s} {names[0]:8s} {mb:11d} {'on' if ckpt else 'off':>13s} "
                  + " ".join(gib(p) for p in phases) + f" {gib(weights + max(phases))}")
    # the second device runs the reference's and the reward model's forwards: logits (b, N, V) and one block
    mb = max(micro_batches(args))
    fwd = (mb * args.max_new_tokens * pcfg.vocab_size * 4 + mb * T * (2 * pcfg.dim + 3 * pcfg.hidden_dim) * wbytes
           + pcfg.vocab_size * pcfg.dim * 4 * (wbytes != 4))
    less = "the reference and reward model" if full else "the reward head"
    print(f"{'two-device':12s} {names[0]:8s} {'as one-device, less ' + less:>49s}")
    print(f"{'':12s} {names[1]:8s} {mb:11d} {'-':>13s} {'-':>8s} {gib(fwd)} {'-':>8s} {gib(frozen_b + fwd)}")
    if full and gpu:  # the paper's point: this is why full fine-tuning took eight A100 80GB, LoRA two
        print(f"\nthe trainable state alone ({gib(train_b).strip()} GiB: fp32 weights, gradients and Adam's moments) "
              f"needs {-(-train_b // 80e9):.0f} GPUs of 80 GB, sharded (the paper: eight A100 80GB with AlpacaFarm; "
              f"with LoRA, two); this plan and train.py do not shard it")


def use_checkpointing(args, device):
    """--activation-checkpointing if given; otherwise on where the plan says that without it the update would
    not fit the CUDA device's memory."""
    if args.activation_checkpointing is not None or device.type != "cuda":
        return bool(args.activation_checkpointing)
    return training_device_peak(args, False) > torch.cuda.get_device_properties(device).total_memory
