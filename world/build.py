"""
The built-in small world: every ingredient of the paper's RLHF experiment, built on a CPU in minutes.

AlpacaFarm (Dubois et al. 2023, arXiv 2305.14387) gives the paper an SFT policy, a reward model learned from
simulated preferences, PPO prompts and simulated annotators. world/tasks.py writes the data (tasks with long,
checkable answers, an imperfect teacher, a gold annotator and a length-biased training annotator); this
file builds the models from it, one stage at a time:

  1 splits     prompts split like AlpacaFarm: SFT demonstrations / preference / PPO / evaluation prompts
  2 tokenizer  sentencepiece BPE trained on the text; the Alpaca template's fixed parts are single pieces
  3 sft        a small LLaMA trained from scratch on the teacher's demonstrations (stage 1 of RLHF)
  4 pairs      two temperature-1 samples of the SFT policy per preference prompt, labelled by the training
               annotator (length bias, label noise)
  5 reward     a reward model (SFT backbone + scalar head) fitted with the Bradley-Terry loss (stage 2)

Each stage writes its files atomically and then a marker, in a temporary sibling directory that is renamed
into place at the end: a killed build is resumed from its last finished stage by the next call.

    python -m world.build --out .world/seed0 --seed 0   # builds once (minutes on 2 CPU cores); then a no-op
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130

import math
import os
import random
import re
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import checkpoints
import llama
import reward
from support import config, exits, files
from support.files import read_json
from world.preferences import preference_accuracy, train_reward_model
from world.tasks import TASKS, check, label_pairs, make_splits, mean_se, prefer, win_rate


@dataclass
class WorldConfig:
    # data, split like AlpacaFarm (10k SFT / 10k preference / 20k PPO / 805 evaluation), smaller where it costs
    n_sft: int = 10000
    n_pref: int = 12000  # two SFT samples each; ~40% of the pairs differ
    n_ppo: int = 4000
    n_eval: int = 500
    p_hard: float = 0.6  # the teacher's misconception rate on hard instances
    p_slip: float = 0.05  # the teacher's random error rate otherwise
    ref_error: float = 0.25  # the reference outputs' random error rate
    length_bias: float = 0.4  # how often the training annotator just prefers the longer response
    noise: float = 0.25  # training label flips (AlpacaFarm's training annotators)
    # the world's LLaMA (policy, reference, reward and value backbones)
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    hidden_dim: int = 192
    max_seq_len: int = 160
    max_new_tokens: int = 96  # room for responses to grow past the longest right answer (~75 tokens)
    # stage 3: SFT; stage 5: reward model
    sft_steps: int = 4000
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    rm_epochs: int = 3
    rm_batch_size: int = 32
    rm_lr: float = 3e-4
    rm_holdout: float = 0.1  # fraction of the pairs held out for the reward model's accuracy

    def check(self):
        """One ValueError naming the first field (its --flag) outside its range: a world built from it would be
        untrained (--sft-steps -5) or fail deep inside a stage (--n-sft 0)."""
        at_least_1 = (lambda v: v >= 1, "at least 1")
        prob = (lambda v: 0 <= v <= 1, "in [0, 1]")
        ranges = {"p_hard": prob, "p_slip": prob, "ref_error": prob, "length_bias": prob, "noise": prob,
                  "sft_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
                  "rm_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
                  "rm_holdout": (lambda v: 0 < v < 1, "in (0, 1)"),
                  "dim": (lambda v: v >= 1 and v % self.n_heads == 0, f"a multiple of --n-heads {self.n_heads}")}
        for name, value in asdict(self).items():
            test, what = ranges.get(name, at_least_1)
            if not test(value):
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be {what}")
        return self

    def model(self, vocab_size):
        return llama.LlamaConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=vocab_size,
                                 hidden_dim=self.hidden_dim, max_seq_len=self.max_seq_len)


LAYOUT = {"tokenizer": "tokenizer.model", "policy": "sft", "reward": "reward", "sft_data": "data/sft.json",
          "pref_prompts": "data/pref.json", "pairs": "data/pairs.json", "prompts": "data/ppo.json",
          "eval": "data/eval.json", "info": "world.json"}


def write_json(path, obj):
    files.write_json(path, obj, indent=1)


# ----------------------------------------------------------------------------- stage 2: the tokenizer

def train_tokenizer(texts, path, vocab_size=512):
    """A LLaMA-style sentencepiece BPE model (byte fallback, digits split, ids unk 0 / bos 1 / eos 2 / pad 3).
    The template's fixed parts are user-defined pieces: a prompt costs ~20 tokens instead of ~60, and every
    model in the world reads shorter sequences (sentencepiece writes a space as U+2581 inside its pieces)."""
    import io
    import sentencepiece as spm
    fixed = [" " + llama.PROMPT_WITH_INPUT.split("\n")[0], " " + llama.PROMPT_NO_INPUT.split("\n")[0],
             "\n\n### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:"]
    lines = [line for t in texts for line in t.split("\n") if line.strip()]  # "\n" elsewhere -> byte <0x0A>
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
            user_defined_symbols=[s.replace(" ", "\u2581") for s in fixed])
    except RuntimeError as e:  # e.g. fewer pieces than bytes + the template's pieces, or more than the text has
        raise ValueError(f"--vocab-size {vocab_size}: sentencepiece cannot train it on this text "
                         f"({str(e).strip().splitlines()[-1].split('] ')[-1].split(' Increase')[0]})") from None
    with open(path + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    os.replace(path + ".tmp", path)
    return llama.Tokenizer(path)


def encode_pair(tok, record, response=None):
    """(prompt ids with BOS, response ids + EOS); the response is `record["output"]` unless given."""
    prompt = tok.encode(llama.alpaca_prompt(record["instruction"], record.get("input") or ""), bos=True)
    return prompt, tok.encode(record["output"] if response is None else response, bos=False, eos=True)


# ----------------------------------------------------------------------------- stage 3: supervised fine-tuning

def lr_at(step, steps, lr, warmup):
    # linear warm-up, then cosine decay to 10% of lr
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def sft_loss(model, tok, batch):
    """Mean cross-entropy of the response tokens (output + EOS) given the prompt; prompts carry no loss."""
    pairs = [encode_pair(tok, r) for r in batch]
    tokens, mask = llama.left_pad([p + r for p, r in pairs], tok.pad_id)  # (B, T), responses at the right end
    N = max(len(r) for _, r in pairs)
    h = model.hidden(tokens[:, :-1], mask[:, :-1])[:, -N:]  # (B, N, dim): the states that predict the last N
    logits = model.output(h).float()  # (B, N, V), the head only where there is a loss
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, -N:], reduction="none")  # (B, N)
    w = torch.tensor([[0.0] * (N - len(r)) + [1.0] * len(r) for _, r in pairs])  # (B, N): response tokens
    return (nll * w).sum() / w.sum()


def train_sft(model, tok, records, steps, batch_size, lr, seed, log=print, every=30.0):
    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = last = time.time()
    # uniform batches: grouping them by length would pad less, but each batch of counting prompts would then share
    # one stopping point, and the model fails to learn where to stop
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        loss = sft_loss(model, tok, [g.choice(records) for _ in range(batch_size)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (time.time() - last >= every or step + 1 == steps):
            last = time.time()
            log(f"    sft step {step + 1}/{steps}  loss {loss.item():.3f}  ({last - t0:.0f} s)")
    model.eval()
    return model


# ----------------------------------------------------------------------------- sampling

def sample(model, tok, records, temperature=0.0, max_new_tokens=96, batch_size=64, generator=None, log=None,
           every=30.0):
    """Responses to the records' prompts: texts (EOS dropped) and the generated token ids (EOS kept when
    emitted, as the PPO rollout scores them). temperature 0 = greedy. A batch decodes until its longest
    response ends, so the prompts go in task order (similar lengths together) and come back in theirs."""
    order = sorted(range(len(records)), key=lambda i: records[i]["task"])
    texts, ids = [None] * len(records), [None] * len(records)
    device, t0, last = next(model.parameters()).device, time.time(), time.time()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        tokens, mask = llama.left_pad([encode_pair(tok, records[i], "")[0] for i in rows], tok.pad_id)  # (B, P)
        out, out_mask = llama.generate(model, tokens.to(device), mask.to(device), max_new_tokens, temperature,
                                       eos_id=tok.eos_id, pad_id=tok.pad_id, generator=generator)  # (B, N)
        for i, row, m in zip(rows, out.tolist(), out_mask.tolist()):
            ids[i] = [t for t, keep in zip(row, m) if keep]
            texts[i] = tok.decode([t for t in ids[i] if t != tok.eos_id])
        if log and time.time() - last >= every:
            last = time.time()
            log(f"    sampled {start + len(rows)}/{len(records)} prompts ({last - t0:.0f} s)")
    return texts, ids


# -----------------------------------------------------------------------------
# the build, one function per stage. Each reads its inputs from the build directory `d` and seeds itself, so
# a resumed build computes exactly what an uninterrupted one does; each returns (info, summary line).

def path(d, name):
    return os.path.join(d, LAYOUT[name])


def publish(tmp, final):
    # a directory appears complete or not at all; one left by a build killed before its marker is replaced
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def build_splits(d, cfg, seed, log):
    splits = make_splits(seed, cfg.n_sft, cfg.n_pref, cfg.n_ppo, cfg.n_eval, cfg.p_hard, cfg.p_slip, cfg.ref_error)
    os.makedirs(os.path.join(d, "data"), exist_ok=True)
    for name, split in (("sft_data", "sft"), ("pref_prompts", "pref"), ("prompts", "ppo"), ("eval", "eval")):
        write_json(path(d, name), splits[split])
    info = {"teacher_accuracy": mean_se([float(check(r, r["output"])) for r in splits["sft"]])[0],
            "reference_accuracy": mean_se([float(check(r, r["output"])) for r in splits["eval"]])[0]}
    return info, (f"splits: {len(TASKS)} tasks; {cfg.n_sft} demonstrations (teacher accuracy "
                  f"{info['teacher_accuracy']:.2f}), {cfg.n_pref} preference / {cfg.n_ppo} PPO / {cfg.n_eval} "
                  f"evaluation prompts (reference accuracy {info['reference_accuracy']:.2f})")


def build_tokenizer(d, cfg, seed, log):
    records = [r for name in ("sft_data", "pref_prompts", "prompts", "eval") for r in read_json(path(d, name))]
    texts = [llama.alpaca_prompt(r["instruction"], r["input"]) for r in records]
    tok = train_tokenizer(texts + [r["output"] for r in records if "output" in r], path(d, "tokenizer"),
                          cfg.vocab_size)
    longest = max(len(encode_pair(tok, r, "")[0]) for r in records)
    if longest + cfg.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"max_seq_len {cfg.max_seq_len} is too short: prompts reach {longest} tokens with this "
                         f"tokenizer, plus max_new_tokens {cfg.max_new_tokens}")
    lengths = [len(encode_pair(tok, r)[1]) for r in read_json(path(d, "sft_data"))]
    info = {"pieces": tok.n_words, "longest_prompt": longest, "demo_length_mean": sum(lengths) / len(lengths),
            "demo_length_max": max(lengths)}
    return info, (f"tokenizer: {tok.n_words} pieces, longest prompt {longest} tokens; demonstrations "
                  f"{info['demo_length_mean']:.1f} tokens on average (EOS included), at most {max(lengths)}")


def build_sft(d, cfg, seed, log):
    torch.manual_seed(seed)
    tok = llama.Tokenizer(path(d, "tokenizer"))
    policy = llama.Llama(cfg.model(tok.n_words))
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"    SFT of a {n_params / 1e6:.2f}M-parameter LLaMA: {cfg.sft_steps} steps of {cfg.sft_batch_size}")
    train_sft(policy, tok, read_json(path(d, "sft_data")), cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, seed, log)
    tmp = path(d, "policy") + ".tmp"
    checkpoints.save_llama(policy, tmp)
    shutil.copy(path(d, "tokenizer"), os.path.join(tmp, "tokenizer.model"))
    publish(tmp, path(d, "policy"))
    # the SFT policy's greedy responses to the held-out prompts, judged by the gold annotator
    ev = read_json(path(d, "eval"))
    responses, ids = sample(policy, tok, ev, 0.0, cfg.max_new_tokens)
    info = {"parameters": n_params}
    info["win_rate"], info["win_rate_se"] = win_rate(ev, responses, [r["output"] for r in ev])
    info["accuracy"], info["accuracy_se"] = mean_se([float(check(r, y)) for r, y in zip(ev, responses)])
    info["length"] = sum(len(y) for y in ids) / len(ids)  # tokens, EOS included
    return info, (f"SFT: {n_params / 1e6:.2f}M parameters; held-out accuracy {info['accuracy']:.2f}, win rate vs "
                  f"reference {info['win_rate']:.3f} ± {info['win_rate_se']:.3f}, {info['length']:.1f} tokens")


def build_pairs(d, cfg, seed, log):
    tok, policy = llama.Tokenizer(path(d, "tokenizer")), checkpoints.load_llama(path(d, "policy"))
    prompts, g = read_json(path(d, "pref_prompts")), torch.Generator().manual_seed(seed)
    y1, _ = sample(policy, tok, prompts, 1.0, cfg.max_new_tokens, generator=g, log=lambda s: log(s + ", 1st of 2"))
    y2, _ = sample(policy, tok, prompts, 1.0, cfg.max_new_tokens, generator=g, log=lambda s: log(s + ", 2nd of 2"))
    labels = label_pairs(prompts, y1, y2, cfg.length_bias, cfg.noise, seed)
    write_json(path(d, "pairs"), [{**r, "output_1": a, "output_2": b, "preference": lab}
                                  for r, a, b, lab in zip(prompts, y1, y2, labels)])
    gold = [(prefer(r, a, b), lab) for r, a, b, lab in zip(prompts, y1, y2, labels)]
    strict = [(p, lab) for p, lab in gold if p != 0.5]
    info = {"pairs": len(prompts), "different": sum(a != b for a, b in zip(y1, y2)),
            "label_gold_agreement": sum((p == 1.0) == (lab == 1) for p, lab in strict) / max(1, len(strict))}
    return info, (f"pairs: {len(prompts)} labelled (length bias {cfg.length_bias}, noise {cfg.noise}), "
                  f"{info['different']} with two different responses; the labels agree with the gold annotator on "
                  f"{info['label_gold_agreement']:.2f} of the pairs it does not call a tie")


def build_reward(d, cfg, seed, log):
    torch.manual_seed(seed)
    tok, policy = llama.Tokenizer(path(d, "tokenizer")), checkpoints.load_llama(path(d, "policy"))
    pairs = [p for p in read_json(path(d, "pairs")) if p["output_1"] != p["output_2"]]  # a tie teaches nothing
    seqs = [(sum(encode_pair(tok, p, p["output_1"]), []), sum(encode_pair(tok, p, p["output_2"]), [])) for p in pairs]
    token_pairs = [(a, b) if p["preference"] == 1 else (b, a) for p, (a, b) in zip(pairs, seqs)]  # (chosen, rejected)
    n_hold = max(1, int(cfg.rm_holdout * len(token_pairs)))
    rm = reward.RewardModel(policy.cfg)
    rm.backbone.load_state_dict(policy.state_dict())  # as AlpacaFarm: the reward model starts from the SFT model
    rm_acc = train_reward_model(rm, token_pairs[n_hold:], token_pairs[:n_hold], cfg.rm_epochs, cfg.rm_lr,
                                cfg.rm_batch_size, tok.pad_id, seed, log=lambda s: log("    " + s))
    # on the held-out pairs: agreement with the gold annotator where it has a preference, and how often the
    # reward model prefers the longer response where the gold annotator prefers the shorter one
    gold, shorter = [], []
    for p, (a, b) in zip(pairs[:n_hold], seqs[:n_hold]):
        g = prefer(p, p["output_1"], p["output_2"])
        if g != 0.5:
            gold.append((a, b) if g == 1.0 else (b, a))
            if len(a) != len(b) and (len(a) < len(b)) == (g == 1.0):
                shorter.append((a, b) if g == 1.0 else (b, a))
    acc = lambda ps: preference_accuracy(rm, ps, cfg.rm_batch_size, tok.pad_id) if ps else float("nan")
    info = {"accuracy": rm_acc, "gold_agreement": acc(gold), "gold_agreement_shorter_better": acc(shorter),
            "gold_pairs": len(gold), "shorter_better_pairs": len(shorter)}
    rm.eval()
    tmp = path(d, "reward") + ".tmp"
    checkpoints.save_reward_model(rm, tmp)
    shutil.copy(path(d, "tokenizer"), os.path.join(tmp, "tokenizer.model"))
    publish(tmp, path(d, "reward"))
    return info, (f"reward model: held-out accuracy {rm_acc:.3f} on the training labels; agrees with the gold "
                  f"annotator on {info['gold_agreement']:.3f} ({len(gold)} pairs), on {info['gold_agreement_shorter_better']:.3f} "
                  f"where the gold annotator prefers the shorter response ({len(shorter)})")


STAGES = [("splits", build_splits), ("tokenizer", build_tokenizer), ("sft", build_sft), ("pairs", build_pairs),
          ("reward", build_reward)]


# ----------------------------------------------------------------------------- bootstrap: the stages, built once

def read_world(file):
    """The world's description (world.json); a damaged file is one ValueError naming it."""
    try:
        info = read_json(file)
        assert isinstance(info, dict) and isinstance(info.get("config"), dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise ValueError(f"{file} is not a world description (damaged?); delete {os.path.dirname(file)} to rebuild "
                         f"it") from None
    return info


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a process that has exited but not yet been reaped by its parent (a zombie) is not building anything
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # not Linux
        return True


def wait_for_other_build(out, log, poll=2.0):
    """If another live process is building `out` (its OUT.tmp-PID exists), wait until it ends; True if it did.
    Two builds of one world would each do the whole work; the second one reads the first one's instead."""
    parent, base = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return False
    others = [int(m[1]) for name in os.listdir(parent)
              if (m := re.fullmatch(re.escape(base) + r"\.tmp-(\d+)", name)) and int(m[1]) != os.getpid()]
    live = [pid for pid in others if alive(pid)]
    if not live:
        return False
    log(f"[world] process {live[0]} is building {out}; waiting for it to finish")
    while alive(live[0]):
        time.sleep(poll)
    return True


def claim_build_dir(out, spec, log):
    """Our temporary build directory `OUT.tmp-PID`. A build left by a dead process (or by this one, after an
    exception) with the same settings is taken over, with its finished stages; other dead ones are removed."""
    parent, base = os.path.split(os.path.abspath(out))
    tmp = os.path.join(parent, f"{base}.tmp-{os.getpid()}")
    found = []
    for name in sorted(os.listdir(parent)):
        m = re.fullmatch(re.escape(base) + r"\.tmp-(\d+)", name)
        if m and (int(m[1]) == os.getpid() or not alive(int(m[1]))):
            d = os.path.join(parent, name)
            try:
                same = read_json(os.path.join(d, "spec.json")) == spec
            except (OSError, ValueError):
                same = False
            done = sum(os.path.exists(os.path.join(d, f".done-{s}.json")) for s, _ in STAGES) if same else -1
            found.append((done, d))
    found.sort(reverse=True)
    for i, (done, d) in enumerate(found):
        if i == 0 and done > 0:
            if d != tmp:
                os.replace(d, tmp)
                log(f"[world] resuming the build left in {d} ({done} of {len(STAGES)} stages finished)")
        else:
            shutil.rmtree(d, ignore_errors=True)
            log(f"[world] removed {d}, left by an interrupted build")
    os.makedirs(tmp, exist_ok=True)
    write_json(os.path.join(tmp, "spec.json"), spec)
    return tmp


def bootstrap(out, seed=0, cfg=None, log=lambda line: print(line, flush=True)):
    """Build the world into directory `out` once; later calls check the settings and return the paths.
    cfg=None takes a world already built in `out` as it is (train.py does this, so a smaller world built with
    `python -m world.build` works too), and builds WorldConfig()'s otherwise."""
    log = log or (lambda *a: None)
    say = lambda text: log(textwrap.fill(text, 100, subsequent_indent=" " * 8))  # within 100 columns
    paths = {k: os.path.join(out, v) for k, v in LAYOUT.items()}
    asked, cfg = cfg, cfg and cfg.check()
    if os.path.exists(paths["info"]):
        built = read_world(paths["info"])["config"]
        spec = {"seed": seed, **asdict(cfg)} if cfg is not None else {**built, "seed": seed}
        if built != spec:
            diff = ", ".join(f"{k}: {built.get(k)} (built) vs {v} (asked)" for k, v in spec.items() if built.get(k) != v)
            raise ValueError(f"{out} holds a world built with other settings ({diff}); delete it or use another directory")
        return paths
    cfg = cfg or WorldConfig()
    spec = {"seed": seed, **asdict(cfg)}
    for d in (out, os.path.dirname(os.path.abspath(out))):
        if os.path.exists(d) and not os.path.isdir(d):
            raise ValueError(f"{d} is a file, not a directory to build the world into")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{out} exists but holds no {LAYOUT['info']}; delete it or use another directory")
    if wait_for_other_build(out, log):  # then take its world as the caller asked (cfg=None: as it is)
        return bootstrap(out, seed, asked, log)
    when = " (about 5 minutes on 2 CPU cores)" if cfg == WorldConfig() else ""
    say(f"[world] building the small world into {out}: once{when}, then reused")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp, t0, info = claim_build_dir(out, spec, log), time.time(), {}
    for i, (name, build) in enumerate(STAGES, 1):
        marker = os.path.join(tmp, f".done-{name}.json")
        if os.path.exists(marker):
            info[name] = read_json(marker)
            say(f"[world] {i}/{len(STAGES)} {name}: finished by the earlier build")
            continue
        t = time.time()
        try:
            info[name], line = build(tmp, cfg, seed, log)
        except ValueError:  # settings that cannot build (a crash or a kill leaves the stages done, for resuming)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json(marker, info[name])
        say(f"[world] {i}/{len(STAGES)} {line} ({time.time() - t:.0f} s; {time.time() - t0:.0f} s in all)")
    write_json(os.path.join(tmp, LAYOUT["info"]), {"config": spec, **info})
    try:
        if os.path.isdir(out):
            os.rmdir(out)  # empty
        os.rename(tmp, out)
    except OSError:
        if not os.path.exists(paths["info"]):  # a concurrent builder finishing first is fine
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ["spec.json"] + [f".done-{s}.json" for s, _ in STAGES]:  # world.json holds what they held
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return paths


def main(argv=None):
    p = config.Parser(description="Build the built-in small world (tokenizer, SFT model, reward model, "
                                            "prompts); `python -m world.judge` judges outputs with its gold annotator.")
    p.add_argument("--out", default=".world/seed0", help="directory to build into (a no-op when already built)")
    p.add_argument("--seed", type=int, default=0)
    sizes = [f for f, v in asdict(WorldConfig()).items() if isinstance(v, (int, float))]
    for f in sizes:
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(WorldConfig, f)), default=getattr(WorldConfig, f))
    args = p.parse_args(argv)
    try:
        if not 0 <= args.seed < 2 ** 63:
            raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
        paths = bootstrap(args.out, args.seed, WorldConfig(**{f: getattr(args, f) for f in sizes}))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for k, v in paths.items():
        print(f"{k:12s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(exits.script(main))
