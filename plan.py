"""
The memory plan of a run (`train.py --dry-run`): the real models built on PyTorch's meta device, so their
parameters are counted exactly and nothing is allocated; activations estimated from what autograd keeps.

    python train.py --preset llama-7b --dry-run
"""
import torch

import checkpoints
import llama
import lora
import ppo
from reward import RewardModel, ValueModel


def saved_bytes_per_token_layer(cfg, w):
    """What autograd keeps per token and layer when training LoRA on wq, wk, wv, wo (frozen projections keep
    no input), w = weight bytes: both RMSNorms' fp32 inputs (8 dim), LoRA dropout's output and 1-byte mask on the
    4 projections (4 (w + 1) dim), SDPA's q, k, v and output (4 w dim; grouped-query k, v are repeated first)
    and SwiGLU's gate, up and silu outputs (3 w hidden_dim). Small terms (rank-8 intermediates, SDPA's
    log-sum-exp) are left out."""
    return 8 * cfg.dim + 4 * (w + 1) * cfg.dim + 4 * w * cfg.dim + 3 * w * cfg.hidden_dim


def print_plan(args, devices):
    gib = lambda n: f"{n / 2**30:8.2f}"
    pcfg = llama.get_preset(args.preset) if args.preset else checkpoints.read_config(args.policy)
    rcfg = pcfg  # AlpacaFarm's reward model has the SFT model's shape; ours carry it in config.json
    if args.reward and not args.preset:
        try:
            rcfg = checkpoints.read_config(args.reward)
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
    # each layer and token of both models, plus the policy's fp32 response logits, three copies
    T, b, w = args.max_prompt_tokens + args.max_new_tokens, args.micro_batch_size, wbytes
    kv_dim = (pcfg.n_kv_heads or pcfg.n_heads) * (pcfg.dim // pcfg.n_heads)
    kv = 2 * pcfg.n_layers * args.generate_batch_size * T * kv_dim * w
    act = (2 * pcfg.n_layers * b * T * saved_bytes_per_token_layer(pcfg, w)
           + 3 * b * args.max_new_tokens * pcfg.vocab_size * 4)
    print(f"activations: KV cache for {args.generate_batch_size} sequences x {T} tokens {gib(kv).strip()} "
          f"GiB; training micro-batch of {b} x {T} tokens (policy + value) ~{gib(act).strip()} GiB (estimate)")
