"""
What a run reports after each PPO step: the held-out evaluation when due (sample.evaluate), one JSON line in
OUT/metrics.jsonl and the console lines a reader sanity-checks; at the end the trainable weights' checksum and
the final adapter. train.py calls `placement` once its models are loaded, `record` once per step and `finish` once.
"""
import os
import shutil
import time

import torch.distributed as dist

import checkpoints
import lora
import sample
from support import rundir


def record(step, stats, args, rank, log, models, tokenizer, records, world):
    """stats with the evaluation on the held-out records (if any) at every --eval-every-th and the last step,
    appended to OUT/metrics.jsonl and printed; models = (policy, reference, reward model)."""
    if records and (step % args.eval_every == 0 or step == args.steps):
        t0 = time.time()
        stats = {**stats, **evaluate(step, *models, tokenizer, records, args, rank, world)}
        stats["time_eval"] = time.time() - t0
    rundir.append_metrics(os.path.join(args.out, "metrics.jsonl"), {"step": step, **stats}, rank)
    log(console_lines(step, args.steps, stats))
    return stats


def evaluate(step, policy, ref, reward_model, tokenizer, records, args, rank, world):
    # sample.evaluate on all the held-out prompts (every rank computes the same); rank 0 writes the responses to
    # OUT/eval/stepNNNN.json
    out_file = os.path.join(args.out, "eval", f"step{step:04d}.json") if rank == 0 else None
    return sample.evaluate(policy, ref, reward_model, tokenizer, records, args.max_new_tokens, args.micro_batch_size,
                           world, out_file, f"lora-rlhf-{args.estimator}-step{step}", args.generate_batch_size)


def console_lines(step, steps, s):
    # step: score: the reward model's; penalty: mean D_t per token; true KL: exact, per response; len: tokens incl.
    # EOS; loss: policy + vf_coef x value loss; tok/s: response tokens sampled and trained per second (the step's
    # seconds are in OUT/metrics.jsonl). eval: greedy responses to the held-out prompts (and the small world's
    # gold annotator's verdicts); step 0 is the SFT policy
    lines = [f"step {step:3d}/{steps} | score {s['score']:+.3f} | penalty {s['penalty']:+.4f} | true KL "
             f"{s['true_kl']:.2f} | len {s['response_length']:.1f} | loss {s['loss']:+.3f} | {s['tokens_per_s']:.0f} "
             f"tok/s" if step else "step   0 (the SFT policy)"]
    if "eval_score" in s:
        win = (f" | win rate {s['eval_win_rate']:.3f} +- {s['eval_win_rate_se']:.3f} | accuracy "
               f"{s['eval_accuracy']:.3f}" if "eval_win_rate" in s else "")
        lines.append(f"   eval | score {s['eval_score']:+.3f} | true KL {s['eval_true_kl']:.2f} | len "
                     f"{s['eval_length']:.1f}" + win)
    return "\n".join(lines)


def placement(devices, policy, ref, params, log):
    """Where train.load_models put the models, in which dtype, on how many ranks, and how many parameters train."""
    log(f"devices: policy + value on {devices[0]}, reference + reward model on {devices[-1]}; "
        f"{policy.output.weight.dtype}, {dist.get_world_size() if dist.is_initialized() else 1} rank(s)")
    if ref is None:
        log("         reference = policy, reward model = value backbone, both with adapters off")
    log("         activation checkpointing " + ("on" if policy.activation_checkpointing else "off"))
    n_train, (n_policy, n_all) = sum(p.numel() for p in params), lora.count_parameters(policy)
    targets = sorted({t for _, t, _ in lora.lora_layers(policy)}, key=list(lora.TARGETS).index)
    if not targets:  # --finetune full
        return log(f"trainable: {n_train:,} (every weight: policy {n_policy:,}, value model + head "
                   f"{n_train - n_policy:,})")
    n_sft = n_all - n_policy  # the fraction of the model that trains: the paper's is 0.12% (rank 8 on LLaMA-7B)
    log(f"trainable: {n_train:,} (policy LoRA on {','.join(targets)} {n_policy:,} = {100 * n_policy / n_sft:.2f}% of "
        f"the SFT model's {n_sft:,}; value LoRA + head {n_train - n_policy:,})")


def finish(args, rank, params, policy, log):
    """The trainable weights' checksum (runs that agree print the same), the final adapter (or, --finetune full, the
    policy as a Hugging Face checkpoint with the SFT model's tokenizer), and the ranks parted."""
    print(f"trainable checksum {sum(p.double().sum().item() for p in params):.12e} (rank {rank})", flush=True)
    if rank == 0 and args.finetune == "full":
        checkpoints.save_llama(policy, os.path.join(args.out, "policy"))
        shutil.copy(args.tokenizer or os.path.join(args.policy, "tokenizer.model"), os.path.join(args.out, "policy"))
        log(f"done: policy in {args.out}/policy, metrics in {os.path.join(args.out, 'metrics.jsonl')}")
    elif rank == 0:
        checkpoints.save_adapter(policy, os.path.join(args.out, "adapter"), base_model_name_or_path=args.policy)
        log(f"done: adapter in {args.out}/adapter, metrics in {os.path.join(args.out, 'metrics.jsonl')}")
    rundir.release()
    if dist.is_initialized():
        dist.destroy_process_group()
