"""
The built-in small world: every ingredient of the paper's RLHF experiment, generated on a CPU in minutes.

AlpacaFarm (Dubois et al. 2023, arXiv 2305.14387) gives the paper an SFT policy, a reward model learned from
(simulated) preferences, PPO prompts, and simulated annotators that compute win rates. This file builds a
miniature of each, with no downloads:

  tasks      procedural instructions whose answers a program checks (copy, reverse, uppercase, count, first
             word, last word, larger number, addition) over 12 short words and small numbers, in the Alpaca
             template, split like AlpacaFarm into SFT demonstrations / preference prompts / PPO prompts /
             held-out evaluation prompts with reference outputs
  teacher    writes the SFT demonstrations with systematic misconceptions on hard instances (long lists,
             carries, close numbers), so the SFT policy is imperfect in a way RL can fix
  annotator  correct beats incorrect; otherwise closer to the right answer (character edit distance); then
             shorter; then a tie. Training labels are flipped with probability `noise` (AlpacaFarm: 25%),
             evaluation is noise-free, as in AlpacaFarm
  stage 0    a sentencepiece tokenizer trained on the generated text (byte fallback: nothing is unknown)
  stage 1    a small LLaMA trained by supervised fine-tuning on the teacher's demonstrations
  stage 2    a reward model trained with the Bradley-Terry loss on annotator-labelled pairs of SFT samples

    python world.py --out .world/seed0 --seed 0     # builds once (~5 min on 2 CPU cores); then a no-op
    python -m pytest tests/test_world.py
"""
import os

# Torch picks its vectorized CPU kernels by the processor (AVX2 or AVX-512), and the two round differently,
# enough for a training run to end elsewhere. Pinning AVX2 (every x86-64 CPU since 2013) makes a CPU run
# independent of whether the machine has AVX-512; set ATEN_CPU_CAPABILITY yourself to choose otherwise.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

import checkpoints
import llama
import reward

# -----------------------------------------------------------------------------
# tasks: each is (instruction paraphrases, generator, solver, "hard" predicate, the teacher's misconception).
# Solvers read the prompt text only, so a checker never trusts a stored answer.

WORDS = ["ant", "bee", "box", "cat", "cup", "dog", "egg", "fig", "hat", "jam", "map", "sun"]


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _nums(text):
    return [int(t) for t in re.findall(r"\d+", text)]


def _pair(rng):
    a = rng.randint(10, 99)  # half of the pairs share the tens digit, the teacher's hard case
    b = rng.randint(10 * (a // 10), 10 * (a // 10) + 9) if rng.random() < 0.5 else rng.randint(10, 99)
    return f"{a} {b}" if a != b else _pair(rng)


@dataclass(frozen=True)
class Task:
    instructions: tuple  # paraphrases; "{a}", "{b}" are filled for tasks without input
    gen: object  # rng -> input text (or "a b" numbers for an instruction-only task)
    solve: object  # (instruction, input) -> the correct output
    hard: object  # (instruction, input) -> is this an instance the teacher gets systematically wrong?
    mistake: object  # (instruction, input) -> the teacher's wrong output on hard instances
    has_input: bool = True


TASKS = {
    "copy": Task(("Repeat the input exactly.", "Copy the input."),
                 lambda r: _words(r, 2, 5), lambda i, x: " ".join(x.split()),
                 lambda i, x: len(x.split()) >= 4, lambda i, x: " ".join(x.split()[:-1])),  # drops the last word
    "reverse": Task(("Reverse the order of the words.", "Write the words in reverse order."),
                    lambda r: _words(r, 2, 4), lambda i, x: " ".join(x.split()[::-1]),
                    lambda i, x: len(x.split()) >= 4, lambda i, x: " ".join(x.split()[::-1][:-1])),
    "upper": Task(("Rewrite the input in capital letters.", "Write the input in uppercase."),
                  lambda r: _words(r, 1, 4), lambda i, x: x.upper(),  # misconception: last word stays lowercase
                  lambda i, x: len(x.split()) >= 3, lambda i, x: " ".join(x.upper().split()[:-1] + x.split()[-1:])),
    "count": Task(("How many words are in the input?", "Count the words in the input."),
                  lambda r: _words(r, 2, 9), lambda i, x: str(len(x.split())),
                  lambda i, x: len(x.split()) >= 6, lambda i, x: str(len(x.split()) - 1)),
    "first": Task(("What is the first word of the input?", "Which word comes first in the input?"),
                  lambda r: _words(r, 3, 7), lambda i, x: x.split()[0],
                  lambda i, x: len(x.split()) >= 6, lambda i, x: x.split()[1]),
    "last": Task(("What is the last word of the input?", "Which word comes last in the input?"),
                 lambda r: _words(r, 3, 7), lambda i, x: x.split()[-1],
                 lambda i, x: len(x.split()) >= 6, lambda i, x: x.split()[-2]),
    "larger": Task(("Which number is larger?", "Write the larger of the two numbers."),
                   _pair, lambda i, x: str(max(_nums(x))),  # misconception: the first one when the tens agree
                   lambda i, x: _nums(x)[0] // 10 == _nums(x)[1] // 10 and _nums(x)[0] < _nums(x)[1],
                   lambda i, x: str(_nums(x)[0])),
    "add": Task(("What is {a} plus {b}?", "Add {a} and {b}."),  # misconception: drops the carry, 47 + 5 = 42
                lambda r: f"{r.randint(10, 99)} {r.randint(1, 9)}", lambda i, x: str(sum(_nums(i))),
                lambda i, x: sum(n % 10 for n in _nums(i)) >= 10,
                lambda i, x: str(_nums(i)[0] // 10 * 10 + sum(n % 10 for n in _nums(i)) % 10), has_input=False),
}


def normalize(text):
    return " ".join(text.split())


def answer(record):
    """The correct output of a record, computed from its prompt text."""
    return TASKS[record["task"]].solve(record["instruction"], record.get("input") or "")


def check(record, response):
    """Task accuracy: is the response exactly the right answer (up to whitespace)?"""
    return normalize(response) == answer(record)


def slip(text, rng):
    """A random error (not a misconception): a number off by one, two words swapped, or one word replaced."""
    if text.isdigit():
        return str(int(text) + rng.choice((-1, 1)))
    w = text.split()
    if len(w) >= 2 and rng.random() < 0.5:
        i = rng.randrange(len(w) - 1)
        if w[i] != w[i + 1]:
            w[i], w[i + 1] = w[i + 1], w[i]
            return " ".join(w)
    i = rng.randrange(len(w))
    w[i] = rng.choice([v for v in WORDS if v != w[i].lower()])
    return " ".join(w)


def teacher(record, rng, p_hard, p_slip):
    """The imperfect demonstrator: its misconception on hard instances with probability p_hard, else a
    random slip with probability p_slip, else the right answer."""
    task, truth = TASKS[record["task"]], answer(record)
    if task.hard(record["instruction"], record["input"]) and rng.random() < p_hard:
        out = task.mistake(record["instruction"], record["input"])
        return out if out != truth else slip(truth, rng)  # e.g. sorting all but an already-last word
    return slip(truth, rng) if rng.random() < p_slip else truth


def make_prompt(rng):
    name = rng.choice(sorted(TASKS))
    task = TASKS[name]
    instruction, x = rng.choice(task.instructions), task.gen(rng)
    if not task.has_input:
        a, b = x.split()
        instruction, x = instruction.format(a=a, b=b), ""
    return {"instruction": instruction, "input": x, "task": name}


def make_splits(seed, n_sft, n_pref, n_ppo, n_eval, p_hard=0.75, p_slip=0.05, ref_error=0.25):
    """Prompts split like AlpacaFarm; all prompts distinct, so evaluation prompts are held out.

    sft: demonstrations {"instruction", "input", "output", "task"} by the imperfect teacher
    pref, ppo: prompts {"instruction", "input", "task"}
    eval: prompts with reference outputs that are wrong (a random slip) with probability ref_error, playing
          the part of text-davinci-003, the paper's reference: a good but fallible model.
    """
    rng, seen, prompts = random.Random(seed), set(), []
    n = n_sft + n_pref + n_ppo + n_eval
    for _ in range(20 * n):
        if len(prompts) == n:
            break
        p = make_prompt(rng)
        key = (p["instruction"], p["input"])
        if key not in seen:
            seen.add(key)
            prompts.append(p)
    if len(prompts) < n:
        raise ValueError(f"only {len(prompts)} distinct prompts could be drawn, {n} were asked for")
    sft, pref = prompts[:n_sft], prompts[n_sft:n_sft + n_pref]
    ppo, ev = prompts[n_sft + n_pref:n_sft + n_pref + n_ppo], prompts[n_sft + n_pref + n_ppo:]
    sft = [{**p, "output": teacher(p, rng, p_hard, p_slip)} for p in sft]
    ev = [{**p, "output": slip(answer(p), rng) if rng.random() < ref_error else answer(p)} for p in ev]
    return {"sft": sft, "pref": pref, "ppo": ppo, "eval": ev}


# -----------------------------------------------------------------------------
# the simulated annotator

def edit_distance(a, b):
    # Levenshtein distance between two strings, one row at a time
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def prefer(record, a, b):
    """Noise-free preference of response a over b: 1.0 (a better), 0.0 (b better) or 0.5 (tie).
    Rules in order: the correct one; the one closer to the right answer (edit distance); the shorter."""
    truth, a, b = answer(record), normalize(a), normalize(b)
    if (a == truth) != (b == truth):
        return float(a == truth)
    da, db = edit_distance(a, truth), edit_distance(b, truth)
    if da != db:
        return float(da < db)
    if len(a) != len(b):
        return float(len(a) < len(b))
    return 0.5


def label_pairs(records, outputs_1, outputs_2, noise=0.25, seed=0):
    """AlpacaFarm-style labels: 1 if output_1 is preferred, 2 if output_2. A tie is a coin flip, and every
    label is flipped with probability `noise` (AlpacaFarm's training annotators flip 25%)."""
    assert len(records) == len(outputs_1) == len(outputs_2), "records and outputs must have the same length"
    rng, labels = random.Random(seed), []
    for rec, a, b in zip(records, outputs_1, outputs_2):
        p, u_tie, u_flip = prefer(rec, a, b), rng.random(), rng.random()  # two draws always: stable streams
        first = p == 1.0 or (p == 0.5 and u_tie < 0.5)
        labels.append(2 - (first != (u_flip < noise)))
    return labels


def win_rate(records, outputs, references, noise=0.0, seed=0):
    """Win rate of outputs against references (tie = 0.5) and its standard error, in [0, 1]."""
    assert len(records) == len(outputs) == len(references), "records, outputs, references: lengths differ"
    rng, scores = random.Random(seed), []
    for rec, o, r in zip(records, outputs, references):
        s = prefer(rec, o, r)
        scores.append(1.0 - s if rng.random() < noise else s)
    return _mean_se(scores)


def _mean_se(xs):
    n = len(xs)
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


# -----------------------------------------------------------------------------
# stage 0: the tokenizer

def train_tokenizer(texts, path, vocab_size=768):
    """A LLaMA-style sentencepiece BPE model (byte fallback, digits split, ids unk 0 / bos 1 / eos 2 / pad 3)."""
    import io
    import sentencepiece as spm
    lines = [line for t in texts for line in t.split("\n") if line.strip()]  # "\n" itself -> byte <0x0A>
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return llama.Tokenizer(path)


def encode_pair(tok, record, response=None):
    """(prompt ids with BOS, response ids + EOS); the response is `record["output"]` unless given."""
    prompt = tok.encode(llama.alpaca_prompt(record["instruction"], record.get("input") or ""), bos=True)
    return prompt, tok.encode(record["output"] if response is None else response, bos=False, eos=True)


# -----------------------------------------------------------------------------
# stage 1: supervised fine-tuning

def lr_at(step, steps, lr, warmup):
    # linear warm-up, then cosine decay to 10% of lr
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def sft_loss(model, tok, batch):
    """Mean cross-entropy of the response tokens (output + EOS) given the prompt; prompts carry no loss."""
    pairs = [encode_pair(tok, r) for r in batch]
    tokens, mask = llama.left_pad([p + r for p, r in pairs], tok.pad_id)  # (B, T)
    is_response = torch.zeros_like(mask)
    for b, (_, r) in enumerate(pairs):
        is_response[b, tokens.shape[1] - len(r):] = 1
    logits = model(tokens[:, :-1], mask[:, :-1])  # (B, T-1, V): position t predicts token t+1
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T-1)
    w = is_response[:, 1:].float()
    return (nll * w).sum() / w.sum()


def train_sft(model, tok, records, steps, batch_size, lr, seed, log=print):
    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        loss = sft_loss(model, tok, [g.choice(records) for _ in range(batch_size)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"    sft step {step + 1}/{steps}  loss {loss.item():.3f}")
    model.eval()
    return model


# -----------------------------------------------------------------------------
# sampling and evaluation

def sample(model, tok, records, temperature=0.0, max_new_tokens=24, batch_size=64, generator=None):
    """Responses to the records' prompts: texts (EOS dropped) and the generated token ids (EOS kept when
    emitted, as the PPO rollout scores them). temperature 0 = greedy."""
    texts, ids = [], []
    for i in range(0, len(records), batch_size):
        prompts = [encode_pair(tok, r, "")[0] for r in records[i:i + batch_size]]
        tokens, mask = llama.left_pad(prompts, tok.pad_id)  # (B, P)
        device = next(model.parameters()).device
        out, out_mask = llama.generate(model, tokens.to(device), mask.to(device), max_new_tokens, temperature=temperature,
                                          eos_id=tok.eos_id, pad_id=tok.pad_id, generator=generator)  # (B, N)
        for row, m in zip(out.tolist(), out_mask.tolist()):
            y = [t for t, keep in zip(row, m) if keep]
            ids.append(y)
            texts.append(tok.decode([t for t in y if t != tok.eos_id]))
    return texts, ids


def score(reward_model, tok, records, response_ids, batch_size=64):
    """Reward-model scores r(x, y) (N,) of responses (token ids, EOS included when emitted)."""
    device, out = next(reward_model.parameters()).device, []
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            seqs = [encode_pair(tok, rec, "")[0] + y for rec, y in
                    zip(records[i:i + batch_size], response_ids[i:i + batch_size])]
            tokens, mask = llama.left_pad(seqs, tok.pad_id)
            out.append(reward_model(tokens.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def evaluate(policy, tokenizer, eval_records, reward_model=None, max_new_tokens=24, batch_size=64):
    """Greedy responses on held-out prompts -> win rate against the reference outputs (simulated annotator,
    noise-free, ties 1/2) with its standard error, task accuracy, reward-model score, response length in
    tokens (EOS included). True KL to the reference policy is train.py's (it needs the reference model)."""
    was_training = policy.training
    policy.eval()
    responses, ids = sample(policy, tokenizer, eval_records, 0.0, max_new_tokens, batch_size)
    policy.train(was_training)
    stats = {}
    stats["win_rate"], stats["win_rate_se"] = win_rate(eval_records, responses, [r["output"] for r in eval_records])
    stats["accuracy"], stats["accuracy_se"] = _mean_se([float(check(r, y)) for r, y in zip(eval_records, responses)])
    stats["length"] = sum(len(y) for y in ids) / len(ids)
    if reward_model is not None:
        stats["reward"] = score(reward_model, tokenizer, eval_records, ids, batch_size).mean().item()
    return stats


# -----------------------------------------------------------------------------
# bootstrap: everything above, built once into a directory

@dataclass
class WorldConfig:
    # data, split like AlpacaFarm (10k SFT / 10k preference / 20k PPO / 805 evaluation), smaller
    n_sft: int = 10000
    n_pref: int = 20000  # two SFT samples each; only ~1/3 of the pairs differ, so more prompts than AlpacaFarm
    n_ppo: int = 2000
    n_eval: int = 300
    p_hard: float = 0.75  # the teacher's misconception rate on hard instances
    p_slip: float = 0.05  # the teacher's random error rate otherwise
    ref_error: float = 0.25  # the reference outputs' random error rate
    noise: float = 0.25  # annotator label flips on the preference pairs (AlpacaFarm's training pool)
    # the world's LLaMA (policy, reference, reward and value backbones)
    vocab_size: int = 768
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    hidden_dim: int = 192
    max_seq_len: int = 128  # prompts are ~40-60 tokens, responses <= 12
    # stage 1: SFT; stage 2: reward model
    sft_steps: int = 3000
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    rm_epochs: int = 3
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    rm_holdout: float = 0.1  # fraction of the pairs held out for the reward model's accuracy
    max_new_tokens: int = 24

    def model(self, vocab_size):
        return llama.LlamaConfig(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=vocab_size,
                                 hidden_dim=self.hidden_dim, max_seq_len=self.max_seq_len)


LAYOUT = {"tokenizer": "tokenizer.model", "policy": "sft", "reward": "reward", "sft_data": "data/sft.json",
          "pairs": "data/pairs.json", "prompts": "data/ppo.json", "eval": "data/eval.json", "info": "world.json"}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def bootstrap(out, seed=0, cfg=None, log=print):
    """Build the world into directory `out` once; later calls check the settings and return the paths.
    cfg=None takes a world already built in `out` as it is (train.py does this, so a smaller world built with
    `python world.py` works too), and builds WorldConfig()'s otherwise. Built in a temporary sibling directory
    and renamed into place, so `out` is either absent or complete."""
    paths = {k: os.path.join(out, v) for k, v in LAYOUT.items()}
    if os.path.exists(paths["info"]):
        with open(paths["info"]) as f:
            built = json.load(f)["config"]
        spec = {"seed": seed, **asdict(cfg)} if cfg is not None else {**built, "seed": seed}
        if built != spec:
            diff = ", ".join(f"{k}: {built.get(k)} (built) vs {v} (asked)" for k, v in spec.items() if built.get(k) != v)
            raise ValueError(f"{out} holds a world built with other settings ({diff}); delete it or use another directory")
        return paths
    cfg = cfg or WorldConfig()
    spec = {"seed": seed, **asdict(cfg)}
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{out} exists but holds no {LAYOUT['info']}; delete it or use another directory")
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "data"))
    try:
        info = _build(tmp, seed, cfg, log or (lambda *a: None))
        _write_json(os.path.join(tmp, LAYOUT["info"]), {"config": spec, **info})
        if os.path.isdir(out):
            os.rmdir(out)  # empty
        os.rename(tmp, out)
    except OSError:
        if not os.path.exists(paths["info"]):  # a concurrent builder finishing first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _build(out, seed, cfg, log):
    t0 = time.time()
    stage = lambda i, text: log(f"[world] {i}/5 {text} ({time.time() - t0:.0f} s)")
    torch.manual_seed(seed)
    P = lambda name: os.path.join(out, LAYOUT[name])

    # 1. tasks: prompts split like AlpacaFarm, the teacher's demonstrations, reference outputs
    splits = make_splits(seed, cfg.n_sft, cfg.n_pref, cfg.n_ppo, cfg.n_eval, cfg.p_hard, cfg.p_slip, cfg.ref_error)
    for name, split in (("sft_data", "sft"), ("prompts", "ppo"), ("eval", "eval")):
        _write_json(P(name), splits[split])
    teacher_acc = sum(check(r, r["output"]) for r in splits["sft"]) / len(splits["sft"])
    ref_acc = sum(check(r, r["output"]) for r in splits["eval"]) / len(splits["eval"])
    stage(1, f"tasks: {len(TASKS)} kinds; {cfg.n_sft} demonstrations (teacher accuracy {teacher_acc:.2f}), "
             f"{cfg.n_pref} preference / {cfg.n_ppo} PPO / {cfg.n_eval} evaluation prompts (reference accuracy {ref_acc:.2f})")

    # 2. tokenizer, trained on every prompt and demonstration
    texts = [llama.alpaca_prompt(r["instruction"], r["input"]) for split in splits.values() for r in split]
    tok = train_tokenizer(texts + [r["output"] for r in splits["sft"] + splits["eval"]], P("tokenizer"), cfg.vocab_size)
    longest = max(len(encode_pair(tok, r, "")[0]) for split in splits.values() for r in split)
    if longest + cfg.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"max_seq_len {cfg.max_seq_len} is too short: prompts reach {longest} tokens with this "
                         f"tokenizer, plus max_new_tokens {cfg.max_new_tokens}")
    stage(2, f"tokenizer: {tok.n_words} pieces, longest prompt {longest} tokens")

    # 3. stage 1: SFT of a fresh LLaMA on the teacher's demonstrations
    policy = llama.Llama(cfg.model(tok.n_words))
    n_params = sum(p.numel() for p in policy.parameters())
    train_sft(policy, tok, splits["sft"], cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, seed, log)
    checkpoints.save_llama(policy, P("policy"))
    shutil.copy(P("tokenizer"), os.path.join(P("policy"), "tokenizer.model"))
    sft_stats = evaluate(policy, tok, splits["eval"], max_new_tokens=cfg.max_new_tokens)
    stage(3, f"SFT: {n_params / 1e6:.2f}M parameters, {cfg.sft_steps} steps; held-out accuracy "
             f"{sft_stats['accuracy']:.2f}, win rate vs reference {sft_stats['win_rate']:.3f} ± {sft_stats['win_rate_se']:.3f}")

    # 4. preference pairs: two samples per prompt from the SFT policy, labelled by the noisy annotator
    g = torch.Generator().manual_seed(seed)
    prompts = splits["pref"]
    y1, ids1 = sample(policy, tok, prompts, 1.0, cfg.max_new_tokens, generator=g)
    y2, ids2 = sample(policy, tok, prompts, 1.0, cfg.max_new_tokens, generator=g)
    labels = label_pairs(prompts, y1, y2, cfg.noise, seed)
    pairs = [{**r, "output_1": a, "output_2": b, "preference": lab} for r, a, b, lab in zip(prompts, y1, y2, labels)]
    _write_json(P("pairs"), pairs)
    # identical responses carry no preference: keep the pairs that differ, as (chosen ids, rejected ids)
    keep = [i for i in range(len(prompts)) if ids1[i] != ids2[i]]
    token_pairs = [(encode_pair(tok, prompts[i], "")[0] + ids1[i], encode_pair(tok, prompts[i], "")[0] + ids2[i])
                   for i in keep]
    token_pairs = [(a, b) if labels[i] == 1 else (b, a) for i, (a, b) in zip(keep, token_pairs)]
    n_hold = max(1, int(cfg.rm_holdout * len(token_pairs)))
    train_pairs, held_pairs = token_pairs[n_hold:], token_pairs[:n_hold]
    stage(4, f"pairs: {len(pairs)} labelled (noise {cfg.noise}), {len(keep)} with two different responses, "
             f"{len(held_pairs)} held out")

    # 5. stage 2: reward model = SFT backbone + scalar head, Bradley-Terry loss (as AlpacaFarm, from the SFT model)
    rm = reward.RewardModel(policy.cfg)
    rm.backbone.load_state_dict(policy.state_dict())
    rm_acc = reward.train_reward_model(rm, train_pairs, held_pairs, cfg.rm_epochs, cfg.rm_lr, cfg.rm_batch_size,
                                       tok.pad_id, seed, log=lambda s: log("    " + s))
    # agreement with the noise-free annotator on the held-out pairs with a strict preference, and on those
    # where exactly one response is correct (what PPO most needs the reward model to see)
    truth, decisive = [], []
    for i, (a, b) in zip(keep[:n_hold], token_pairs[:n_hold]):
        p = prefer(prompts[i], y1[i], y2[i])
        if p != 0.5:
            truth.append((a, b) if (p == 1.0) == (labels[i] == 1) else (b, a))
            if check(prompts[i], y1[i]) != check(prompts[i], y2[i]):
                decisive.append(truth[-1])
    acc = lambda ps: reward.preference_accuracy(rm, ps, cfg.rm_batch_size, tok.pad_id) if ps else float("nan")
    truth_acc, decisive_acc = acc(truth), acc(decisive)
    rm.eval()
    checkpoints.save_reward_model(rm, P("reward"))
    shutil.copy(P("tokenizer"), os.path.join(P("reward"), "tokenizer.model"))
    stage(5, f"reward model: held-out accuracy {rm_acc:.3f} on noisy labels; against the noise-free annotator "
             f"{truth_acc:.3f} ({len(truth)} pairs), {decisive_acc:.3f} where one response is correct ({len(decisive)})")
    return {"seconds": round(time.time() - t0, 1), "teacher_accuracy": teacher_acc, "reference_accuracy": ref_acc,
            "sft": sft_stats, "reward_model_accuracy": rm_acc, "reward_model_true_accuracy": truth_acc,
            "reward_model_correct_vs_incorrect_accuracy": decisive_acc}


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the built-in small world (tokenizer, SFT model, reward model, prompts).")
    p.add_argument("--out", default=".world/seed0", help="directory to build into (a no-op when already built)")
    p.add_argument("--seed", type=int, default=0)
    for f in ("n_sft", "n_pref", "n_ppo", "n_eval", "sft_steps", "rm_epochs"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(WorldConfig, f))
    args = p.parse_args(argv)
    cfg = WorldConfig(**{f: getattr(args, f) for f in ("n_sft", "n_pref", "n_ppo", "n_eval", "sft_steps", "rm_epochs")})
    try:
        paths = bootstrap(args.out, args.seed, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"world.py: {e}", file=sys.stderr)
        sys.exit(1)
    for k, v in paths.items():
        print(f"{k:10s} {v}")


if __name__ == "__main__":
    main()
