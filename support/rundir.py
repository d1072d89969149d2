"""
The run's bookkeeping: its directory OUT (what a training run writes there, how it resumes exactly, how it
keeps a user's files safe) and its ranks. train.py calls each of these as one line; none of them touches
the algorithm.

    OUT/metrics.jsonl    one JSON line per step
    OUT/checkpoint/      state.pt (trainable tensors, optimizer, scheduler, step, data position, beta, flags),
                         rng-rankN.pt per rank, policy_adapter/ (PEFT layout, usable on its own)
    OUT/adapter/, eval/  the final policy adapter; the evaluations' responses (AlpacaEval JSON)
    OUT/previous-N/      an earlier run's files, moved aside by a new run instead of overwritten
    OUT/.lock            the PID of the run writing to OUT, while it runs; a second run on the same OUT is refused

Ctrl-C (SIGINT) or SIGTERM stops a run with the last finished step saved as the checkpoint, and a worker
whose torchrun launcher dies gets SIGTERM from the kernel, so it never keeps writing to OUT on its own.
"""
import contextlib
import copy
import ctypes
import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import checkpoints
import lora
from support import files

RUN_FILES = ("metrics.jsonl", "checkpoint", "checkpoint.old", "adapter", "policy", "eval")


# ----------------------------------------------------------------------------- before any work

_lock = []  # the open OUT/.lock of this process's run


def claim(out):
    """Create OUT, check it is writable, and lock it (fcntl.flock on OUT/.lock, which the kernel releases
    when the process dies, so a lock left by a dead run is taken over). Returns a message if a stale lock
    was taken over, else None. One run per process: a lock this process still holds is released first."""
    release()
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory")
    created, path = not os.path.exists(out), os.path.join(out, ".lock")
    while True:
        try:
            os.makedirs(out, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a file in the way, a path under a file, no permission, a read-only disk
            raise ValueError(f"--out {out}: cannot write there ({e.strerror})") from None
        holder = os.read(fd, 64).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"--out {out} is in use by another run (PID {holder or '?'}, {out}/.lock); wait for "
                             f"it to finish or choose another --out") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)  # locked a .lock that the run before us removed as it ended: open the one at the path now
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _lock.append((fd, out, created))
    return f"took over {out}/.lock from PID {holder}, which is no longer running" if holder else None


def release():
    """The run ended (or failed): OUT/.lock is removed, and OUT too if this run created it and wrote nothing."""
    while _lock:
        fd, out, created = _lock.pop()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(out, ".lock"))  # still locked: a run waiting on this file re-opens (claim)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run's files stay
                os.rmdir(out)


class Interrupted(Exception):
    pass


_signalled = []


def stop_on_signals():
    """For the process's entry point. SIGINT / SIGTERM: with one rank, raise Interrupted at once (the loop
    then saves the last finished step, within torchrun's 30 s grace);
    with several ranks, only note it, and the ranks stop together at the end of the step (interrupted()). A
    worker started by torchrun asks the kernel for SIGTERM when its launcher dies (Linux's PR_SET_PDEATHSIG)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))

    def handler(sig, frame):
        _signalled.append(sig)
        if world_size == 1 and len(_signalled) == 1:
            raise Interrupted(signal.Signals(sig).name)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher died before the request
            sys.exit("error: the torchrun launcher that started this worker is gone")


def interrupted(device):
    """With several ranks: did any rank get a signal? (all ranks call this at the same point of a step)."""
    flag = torch.tensor([float(bool(_signalled))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


# ----------------------------------------------------------------------------- the ranks

def init_ranks(devices, world_size, local_world):
    """This rank's device (or its share of the CPU cores), then the process group of all ranks."""
    if devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])
    elif local_world > 1:  # CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:  # generous timeout: rank 0 may build the small world while the others wait at a barrier
        dist.init_process_group("nccl" if devices[0].type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def sync_grads(params, world_size):
    # the mean of the ranks' gradients, so every rank takes the same optimizer step
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size


def mean_over_ranks(stats, world_size, dev):
    if world_size == 1:
        return stats
    t = torch.tensor([float(stats[k]) for k in sorted(stats)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return {k: v / world_size for k, v in zip(sorted(stats), t.tolist())}


# ----------------------------------------------------------------------------- the run's state in memory

def trainable_tensors(policy, value):
    out = {f"policy.{n}": p for n, p in policy.named_parameters() if p.requires_grad}
    out.update({f"value.{n}": p for n, p in value.named_parameters() if p.requires_grad})
    return out


def snapshot(policy, value, optimizer, scheduler, step, pos, kl_coef, generator):
    """Everything a run needs to continue exactly, copied (kept in memory too, to go back after a NaN)."""
    return dict(trainable={n: p.detach().cpu().clone() for n, p in trainable_tensors(policy, value).items()},
                optimizer=copy.deepcopy(optimizer.state_dict()), scheduler=scheduler.state_dict(), step=step,
                pos=pos, kl_coef=kl_coef, rng=torch.get_rng_state(), gen_rng=generator.get_state().cpu(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


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


# ----------------------------------------------------------------------------- the files

def append_metrics(path, record, rank=0):
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_metrics(path, step):
    """Drop the lines logged after `step` (the resumed run logs them again) and a cut-off last line."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.endswith("\n")]
    kept = []
    for i, line in enumerate(lines):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: line {i + 1} is not a metrics line; remove it to resume") from None
    files.atomic_write(path, lambda tmp: open(tmp, "w").writelines(kept))


def move_earlier_run(out):
    """A new run never overwrites an earlier one: its files in OUT move to OUT/previous-N (the first free N).
    Returns that directory, or None if OUT held no run."""
    ours = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not ours:
        return None
    n = 1
    while os.path.exists(os.path.join(out, f"previous-{n}")):
        n += 1
    old = os.path.join(out, f"previous-{n}")
    os.makedirs(old)
    for f in ours:
        os.replace(os.path.join(out, f), os.path.join(old, f))
    return old


def save_checkpoint(state, args, out, rank, policy):
    """Every rank writes into OUT/checkpoint.tmp; then renames publish it, so a crash leaves the old
    checkpoint or the new one, never half of one (a crash between the renames leaves checkpoint.old).
    policy_adapter/ is written from `policy`, which must hold state's weights (snapshot or restore first)."""
    final, tmp = os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    rng = {k: state[k] for k in ("rng", "gen_rng", "cuda_rng")}
    try:  # a full disk: the new checkpoint is dropped, the old one stays whole
        os.makedirs(tmp, exist_ok=True)
        torch.save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))
        if rank == 0:
            torch.save({**{k: v for k, v in state.items() if k not in rng}, "args": args},
                       os.path.join(tmp, "state.pt"))
            if lora.lora_layers(policy):  # (a fully fine-tuned policy is in state.pt only)
                checkpoints.save_adapter(policy, os.path.join(tmp, "policy_adapter"))
    except Exception as e:  # OSError, or the error type of torch's or safetensors' writer
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ValueError(f"could not write the checkpoint of step {state['step']} to {tmp} ({reason}); "
                         f"{final} is unchanged") from None
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
    written = len([f for f in os.listdir(path) if re.fullmatch(r"rng-rank\d+\.pt", f)])
    if written != (ranks := int(os.environ.get("WORLD_SIZE", 1))):  # each rank draws its own share of the rollouts
        raise ValueError(f"--resume: {path} was written by {written} rank(s), this run has {ranks}; resume it with "
                         f"torchrun --nproc_per_node={written}")
    state = {}
    for f in ("state.pt", f"rng-rank{rank}.pt"):
        try:  # weights_only: a pickle that would run code is refused, not executed
            state.update(torch.load(os.path.join(path, f), map_location="cpu", weights_only=True))
        except Exception as e:  # truncated, empty, garbage, or pickled code: torch raises many kinds
            raise ValueError(f"--resume: {os.path.join(path, f)} is not a readable checkpoint file "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'empty'})") from None
    return state


def resume(out, rank, args, may_change, policy, value, optimizer, scheduler, generator):
    """The run in OUT/checkpoint restored, unless it was written with other settings than `args` (a dict; the
    names in may_change may differ), and OUT/metrics.jsonl cut back to its step. Returns its state."""
    state = load_checkpoint(out, rank)
    changed = [f"--{k.replace('_', '-')} {state['args'].get(k)} -> {v}" for k, v in args.items()  # a flag newer
               if k not in may_change and k in state["args"] and state["args"][k] != v]  # than it: restore checks
    if changed:
        raise ValueError(f"--resume: {out}/checkpoint was written with other settings: {'; '.join(changed)}")
    if args["decay_steps"] is None and args["steps"] != state["args"]["steps"]:  # the lr schedule ends at --steps
        raise ValueError(f"--resume: {out}/checkpoint's learning rate decays to 0 at its --steps "
                         f"{state['args']['steps']} (--decay-steps unset); --steps {args['steps']} would change that "
                         f"schedule or run at lr 0: resume with --steps {state['args']['steps']}, or start a run with "
                         f"--decay-steps")
    restore(state, policy, value, optimizer, scheduler, generator)
    if rank == 0:
        truncate_metrics(os.path.join(out, "metrics.jsonl"), state["step"])
    return state


# ----------------------------------------------------------------------------- start and stop

def start(args, rank, may_change, log, policy, value, optimizer, scheduler, generator):
    """(step, prompt position, beta) to start from: OUT/checkpoint's with --resume (every flag but those in
    may_change must match it), else 0, with an earlier run's files in OUT moved aside, never overwritten.
    args: the run's flags as a dict."""
    out = args["out"]
    if args["resume"]:
        state = resume(out, rank, args, may_change, policy, value, optimizer, scheduler, generator)
        log(f"resumed from {out}/checkpoint at step {state['step']}")
        return state["step"], state["pos"], state["kl_coef"]
    if rank == 0 and (moved := move_earlier_run(out)):
        log(f"moved the earlier run in {out} to {moved} (`--out {moved} --resume` would continue it)")
    return 0, 0, args["kl_coef"]


def stop(e, good, args, rank, policy, value, optimizer, scheduler, generator):
    """After a NaN or a signal: back to the last finished step `good`, save it, and raise e saying where it is."""
    restore(good, policy, value, optimizer, scheduler, generator)
    save_checkpoint(good, args, args["out"], rank, policy)
    where = f"the checkpoint of step {good['step']} is in {args['out']}/checkpoint (--resume continues from it)"
    if isinstance(e, FloatingPointError):
        raise FloatingPointError(f"{e}; stopped at PPO step {good['step'] + 1}, {where}") from None
    raise Interrupted(f"interrupted ({e}): {where}") from None
