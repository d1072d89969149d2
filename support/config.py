"""
train.py's command line, built from its `@dataclass Args`: one flag per field (--kl-coef for kl_coef), its help the
string under the field (read from the source, as CleanRL's tyro does), and RANGES, the one table of the values each
knob may take; and sample.py's checks of its flags. A value out of range ends the run with one line naming the flag.

    python train.py --help
"""
import argparse
import ast
import dataclasses
import inspect
import math
import os
import re
import textwrap
import typing

import torch

import divergences
import lora

AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")

# field -> (test, what the valid values are); the fields not named here take any value of their type
RANGES = {
    "kl_coef": (NON_NEGATIVE[0], "a finite number >= 0 (--estimator negative_kl rewards divergence)"),
    "kl_target": POSITIVE,
    "k_beta": NON_NEGATIVE,
    "no_eos_penalty": (lambda v: v is None or math.isfinite(v), "a finite number"),
    "gamma": UNIT,
    "lam": UNIT,
    "cliprange": POSITIVE,
    "cliprange_value": POSITIVE,
    "vf_coef": NON_NEGATIVE,
    "ppo_epochs": AT_LEAST_1,
    "step_batch_size": AT_LEAST_1,
    "micro_batch_size": AT_LEAST_1,
    "max_grad_norm": POSITIVE,
    "max_new_tokens": AT_LEAST_1,
    "temperature": (lambda v: v == 0 or 1e-3 <= v < math.inf, "0 (greedy) or a finite number >= 0.001"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "generate_batch_size": AT_LEAST_1,
    "max_prompt_tokens": AT_LEAST_1,
    "lora_rank": AT_LEAST_1,
    "lora_alpha": POSITIVE,
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr": POSITIVE,
    "warmup_steps": (lambda v: v >= 0, "at least 0"),
    "steps": AT_LEAST_1,
    "rollout_batch_size": AT_LEAST_1,
    "eval_every": AT_LEAST_1,
    "save_every": AT_LEAST_1,
    "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"),  # torch's generators take a 64-bit seed
    "world_seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"),
}


class Parser(argparse.ArgumentParser):
    """argparse for every entry point, with a bad flag as one line (`prog: error: ...`, exit status 2) instead of
    the whole usage block; --help prints that."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def field_docs(cls):
    """{field name: the string literal under it} from the dataclass's source, whitespace collapsed."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def parser(cls, description):
    """An argparse parser with a flag per field of cls; flags not given are left out of the parsed namespace."""
    p = Parser(description=description)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = next(t for t in (typing.get_args(f.type) or (f.type,)) if t is not type(None))
        flag, help = "--" + f.name.replace("_", "-"), docs[f.name]
        help += "" if "(default:" in help else f" (default: {f.default})"  # a doc may say its default in words
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help, metavar=kind.__name__.upper())
    return p


def parse(cls, world, argv=None):
    """(args, small_world): the flags given, over world (no checkpoints given) or cls()'s defaults; checked."""
    changed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(world).items()
                        if v != getattr(cls(), k))
    given = vars(parser(cls, "PPO with LoRA (Sun et al. 2023). Defaults are the paper's; the small world changes "
                        + changed).parse_args(argv))
    small_world = not any(k in given for k in ("policy", "reward", "prompts", "preset"))
    args = dataclasses.replace(world if small_world else cls(), **given)
    check_args(args, small_world)
    return args, small_world


def check_args(args, small_world):
    """Every flag in range, or one line naming it."""
    if not small_world and not args.preset and not (args.policy and args.reward and args.prompts):
        raise ValueError("give --policy, --reward and --prompts together, or none of them for the small world")
    if args.dry_run and small_world:
        raise ValueError("--dry-run needs --preset NAME (e.g. llama-7b) or --policy/--reward/--prompts")
    if small_world and (given := [f for f in ("eval_prompts", "tokenizer") if getattr(args, f)]):
        raise ValueError(f"--{given[0].replace('_', '-')} applies to real checkpoints: the small world has its own "
                         f"(give --policy, --reward and --prompts with it)")
    for flag in ("policy", "reward") if not small_world and not args.preset else ():
        if not os.path.isdir(getattr(args, flag)):
            raise ValueError(f"--{flag} must be a checkpoint directory, got {getattr(args, flag)}")
    if args.preset and not args.dry_run:
        raise ValueError("--preset only plans memory (--dry-run); training needs --policy/--reward/--prompts")
    divergences.get_estimator(args.estimator)  # unknown names: one line listing the valid ones
    if args.finetune not in ("lora", "full"):
        raise ValueError(f"--finetune must be lora or full, got {args.finetune}")
    targets = parse_targets(args.lora_targets)
    if not targets or len(set(targets)) < len(targets) or not set(targets) <= set(lora.TARGETS):
        raise ValueError(f"--lora-targets must be some of {','.join(lora.TARGETS)} (each once, comma-separated) or "
                         f"all, got {args.lora_targets}")
    for name, (test, what) in RANGES.items():
        if not test(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.decay_steps is not None and args.decay_steps < args.steps:
        raise ValueError(f"--decay-steps must be at least --steps {args.steps} (the lr is 0 from --decay-steps on), "
                         f"got {args.decay_steps}")


def parse_targets(spec):
    """--lora-targets: "wk,wq" -> ("wq", "wk"), in lora.TARGETS' order (one set, one initialization); "all" -> all."""
    order = lambda t: list(lora.TARGETS).index(t) if t in lora.TARGETS else len(lora.TARGETS)  # unknown: refused
    return tuple(lora.TARGETS) if spec == "all" else tuple(sorted((t.strip() for t in spec.split(",")), key=order))


def check_sample_args(args):
    """sample.py's flags in range, or one line naming the flag."""
    for flag, ok, what in (("--checkpoint", os.path.isdir(args.checkpoint), "a checkpoint directory"),
                           ("--adapter", not args.adapter or os.path.isdir(args.adapter), "an adapter directory"),
                           ("--max-new-tokens", args.max_new_tokens is None or args.max_new_tokens >= 1, "at least 1"),
                           ("--temperature", RANGES["temperature"][0](args.temperature), RANGES["temperature"][1]),
                           ("--device", re.fullmatch(r"cpu|cuda(:\d+)?", args.device), "cpu, cuda or cuda:N"),
                           ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
                           ("--batch-size", args.batch_size >= 1, "at least 1"),
                           ("--seed", 0 <= args.seed < 2 ** 63, "in [0, 2**63)"),
                           ("--merge", args.adapter or not args.merge, "given with --adapter"),
                           ("--input", args.prompt is not None or not args.input, "given with --prompt"),
                           ("--out", not args.out or not os.path.isdir(args.out), "a file, not a directory"),
                           ("--out", not args.out or os.path.isdir(os.path.dirname(os.path.abspath(args.out))),
                            "in an existing directory")):
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ValueError(f"{flag} must be {what}" + ("" if isinstance(value, bool) else f", got {value}"))
    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device name") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device")
