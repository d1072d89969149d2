"""
The run's data: the built-in small world's files (built once, by rank 0), or the files given; the tokenizer, the
PPO prompts in the Alpaca template (longer than --max-prompt-tokens dropped, as AlpacaFarm does) and the held-out
evaluation prompts, and the PPO prompts as an endless shuffled stream. train.py calls each as one line.
"""
import dataclasses
import os

import torch

import checkpoints
import llama
from support import plan, rundir


def small_world(args, rank, log):
    """args pointing at the built-in small world's files, and world/tasks.py (its gold annotator judges the
    evaluations: win_rate, check). Rank 0 builds the world once; the others wait, then read the finished directory."""
    from world import build, tasks
    world_dir = os.path.join(args.world_dir, f"seed{args.world_seed}")
    paths = build.bootstrap(world_dir, seed=args.world_seed, log=log) if rank == 0 else None
    rundir.barrier()
    paths = paths or build.bootstrap(world_dir, seed=args.world_seed, log=None)
    return dataclasses.replace(args, policy=paths["policy"], reward=paths["reward"], prompts=paths["prompts"],
                               eval_prompts=paths["eval"]), tasks


def read(args, log):
    """The tokenizer, the PPO prompts as token lists (in the Alpaca template; longer than --max-prompt-tokens
    dropped, as AlpacaFarm does) and the held-out evaluation records (or None)."""
    tokenizer = llama.Tokenizer(args.tokenizer or os.path.join(args.policy, "tokenizer.model"))
    cfg = checkpoints.read_config(args.policy)
    plan.check_context(args, cfg)  # before any prompt is dropped for lack of room
    prompts = [tokenizer.encode(llama.alpaca_prompt(r["instruction"], r["input"]))
               for r in checkpoints.read_prompts(args.prompts)]
    kept = [p for p in prompts if len(p) <= args.max_prompt_tokens]
    log(f"prompts: {len(kept)} of {len(prompts)} from {args.prompts} (dropped {len(prompts) - len(kept)} longer "
        f"than {args.max_prompt_tokens} tokens)")
    if not kept:
        raise ValueError(f"{args.prompts}: no prompt fits in --max-prompt-tokens {args.max_prompt_tokens}")
    if not args.eval_prompts:
        return tokenizer, kept, None
    # held out: every prompt is kept (an evaluation set is compared whole) unless it cannot be answered at all
    evals = checkpoints.read_prompts(args.eval_prompts)
    room = cfg.max_seq_len - args.max_new_tokens
    fits = [r for r in evals if len(tokenizer.encode(llama.alpaca_prompt(r["instruction"], r["input"]))) <= room]
    if len(fits) < len(evals):
        log(f"eval prompts: {len(fits)} of {len(evals)} from {args.eval_prompts} (dropped {len(evals) - len(fits)} "
            f"longer than {room} tokens, which leave no room for --max-new-tokens {args.max_new_tokens})")
    if not fits:
        raise ValueError(f"{args.eval_prompts}: no prompt leaves room for --max-new-tokens {args.max_new_tokens}")
    return tokenizer, kept, fits


def batch(prompts, pos, n, seed):
    """The n prompts after position pos of an endless stream: a fresh shuffle per pass, from the seed."""
    order = lambda epoch: torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return [prompts[order(i // len(prompts))[i % len(prompts)]] for i in range(pos, pos + n)]
