"""
The small world's data: checkable tasks, an imperfect teacher, and two simulated annotators (world/build.py trains
the models on it).

AlpacaFarm (Dubois et al. 2023, arXiv 2305.14387) gives the paper SFT demonstrations, preference prompts, PPO
prompts and held-out evaluation prompts with reference outputs, and simulated annotators that label training
preferences and judge win rates. Here each ingredient is a program:

  tasks       instructions in the Alpaca template whose correct answers run to tens of tokens (counting,
              spelling, sorting, addition with the carry written out); a solver reads only the prompt text
  teacher     writes the demonstrations; on hard instances it follows a systematic misconception, mostly
              leaving something out (the last number, a doubled letter, a repeated word, a carry)
  gold        the evaluation annotator: correct beats incorrect, otherwise the one closer to the right answer
              (character edit distance), otherwise a tie. It has no opinion on length
  training    the annotator that labels the reward model's pairs: the gold judgment, except that with
              probability `length_bias` it simply prefers the longer response, then a label flip with
              probability `noise` (AlpacaFarm's training annotators: 25%). Human, GPT-4 and AlpacaFarm's
              simulated raters all prefer longer outputs; the reward model learns that, the gold judge
              does not reward it, and PPO can exploit the difference

    python -m pytest tests/test_world.py
"""
import functools
import math
import random
import re
from dataclasses import dataclass

WORDS = ["ant", "bee", "box", "cat", "cup", "dog", "egg", "fig", "hat", "jam", "kit", "map", "owl", "pen", "sun",
         "zoo"]


def nums(text):
    return [int(t) for t in re.findall(r"\d+", text)]


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


# -----------------------------------------------------------------------------
# tasks. Each solver and misconception reads (instruction, input) only, so a checker never trusts a stored answer.

def count_make(rng):
    a = rng.randint(1, 70)
    return {"a": a, "b": a + rng.randint(3, 23)}, ""


def count_solve(i, x):
    a, b = nums(i)
    return " ".join(str(n) for n in range(a, b + 1))


def count_mistake(i, x):  # stops one short of the end
    a, b = nums(i)
    return " ".join(str(n) for n in range(a, b))


def spell_solve(i, x):
    return ", ".join(" ".join(w) for w in x.split())


def spell_mistake(i, x):  # writes a doubled letter once: "b e" for bee
    return ", ".join(" ".join(re.sub(r"(.)\1", r"\1", w)) for w in x.split())


def sort_solve(i, x):
    return ", ".join(sorted(x.split()))


def sort_mistake(i, x):  # keeps one copy of a repeated word
    return ", ".join(sorted(set(x.split())))


def add_make(rng):
    return {"a": rng.randint(10, 99), "b": rng.randint(10, 99)}, ""


def add_work(a, b, forget_carry=False):
    ones = a % 10 + b % 10
    carry = 0 if forget_carry else ones // 10
    tens = a // 10 + b // 10 + carry
    total = 10 * tens + ones % 10
    return (f"{a % 10} + {b % 10} = {ones}, write {ones % 10} carry {carry}. "
            f"{a // 10} + {b // 10} + {carry} = {tens}. So {a} + {b} = {total}")


@dataclass(frozen=True)
class Task:
    name: str
    instructions: tuple  # paraphrases, formatted with the fields `make` returns
    make: object  # rng -> (fields of the instruction, input text)
    solve: object  # (instruction, input) -> the correct output
    hard: object  # (instruction, input) -> does the teacher's misconception apply?
    mistake: object  # (instruction, input) -> the teacher's output on a hard instance


def add_solve(i, x):
    return add_work(*nums(i)[:2])


def add_mistake(i, x):  # forgets the carry: 47 + 85 = 122
    return add_work(*nums(i)[:2], forget_carry=True)


def differs(mistake, solve):  # "hard" for a misconception that only applies to some inputs
    return lambda i, x: mistake(i, x) != solve(i, x)


TASKS = {t.name: t for t in [
    Task(name="count", instructions=("Count from {a} to {b}.", "Write the numbers from {a} to {b}."),
         make=count_make, solve=count_solve, hard=lambda i, x: True, mistake=count_mistake),
    Task(name="spell", instructions=("Spell each word letter by letter.", "Spell out the words, one letter at a time."),
         make=lambda rng: ({}, words(rng, 4, 9)), solve=spell_solve, hard=differs(spell_mistake, spell_solve),
         mistake=spell_mistake),
    Task(name="sort", instructions=("Sort the words in alphabetical order.", "Put the words in alphabetical order."),
         make=lambda rng: ({}, words(rng, 4, 10)), solve=sort_solve, hard=differs(sort_mistake, sort_solve),
         mistake=sort_mistake),
    Task(name="add", instructions=("Add {a} and {b} step by step.", "What is {a} plus {b}? Show the carry."),
         make=add_make, solve=add_solve, hard=differs(add_mistake, add_solve), mistake=add_mistake),
]}


def normalize(text):
    return " ".join(text.split())


def answer(record):
    """The correct output of a record, computed from its prompt text."""
    return TASKS[record["task"]].solve(record["instruction"], record.get("input") or "")


def check(record, response):
    """Task accuracy: is the response exactly the right answer (up to whitespace)?"""
    return normalize(response) == answer(record)


def slip(text, rng):
    """A random error, not a misconception: one item (a word or number) replaced, dropped or doubled."""
    w = text.split()
    i, kind = rng.randrange(len(w)), rng.randrange(3)
    if kind == 0:
        token = w[i].strip(",.")
        other = str(int(token) + rng.choice((-1, 1))) if token.isdigit() else \
            rng.choice([v for v in WORDS if v != token]) if token in WORDS else \
            rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != token])
        w[i] = w[i].replace(token, other)
    elif kind == 1 and len(w) > 1:
        del w[i]
    else:
        w.insert(i, w[i])
    out = " ".join(w)
    return out if out != text else slip(text, rng)


def teacher(record, rng, p_hard, p_slip):
    """The imperfect demonstrator: its misconception on hard instances with probability p_hard, else a
    random slip with probability p_slip, else the right answer."""
    task, truth = TASKS[record["task"]], answer(record)
    if task.hard(record["instruction"], record["input"]) and rng.random() < p_hard:
        return task.mistake(record["instruction"], record["input"])
    return slip(truth, rng) if rng.random() < p_slip else truth


def make_prompt(rng):
    task = TASKS[rng.choice(sorted(TASKS))]
    fields, x = task.make(rng)
    return {"instruction": rng.choice(task.instructions).format(**fields), "input": x, "task": task.name}


def make_splits(seed, n_sft, n_pref, n_ppo, n_eval, p_hard=0.6, p_slip=0.05, ref_error=0.25):
    """Prompts split like AlpacaFarm, each split with the same mix of tasks. Evaluation prompts are distinct and
    held out: none appears in a training split (where a prompt may recur, as counting prompts, with ~3,000
    possible, do among the ~26,000 drawn).

    sft: demonstrations {"instruction", "input", "output", "task"} by the imperfect teacher
    pref, ppo: prompts {"instruction", "input", "task"}
    eval: prompts with reference outputs that are wrong (a random slip) with probability ref_error, playing
          the part of text-davinci-003, the paper's reference: a good but fallible model.
    """
    rng, ev, held = random.Random(seed), [], set()
    key = lambda p: (p["instruction"], p["input"])
    for _ in range(20 * n_eval):
        if len(ev) == n_eval:
            break
        p = make_prompt(rng)
        if key(p) not in held:
            held.add(key(p))
            ev.append(p)
    if len(ev) < n_eval:
        raise ValueError(f"only {len(ev)} distinct evaluation prompts could be drawn, {n_eval} were asked for")
    train = []
    while len(train) < n_sft + n_pref + n_ppo:
        p = make_prompt(rng)
        if key(p) not in held:
            train.append(p)
    sft, pref, ppo = train[:n_sft], train[n_sft:n_sft + n_pref], train[n_sft + n_pref:]
    sft = [{**p, "output": teacher(p, rng, p_hard, p_slip)} for p in sft]
    ev = [{**p, "output": slip(answer(p), rng) if rng.random() < ref_error else answer(p)} for p in ev]
    return {"sft": sft, "pref": pref, "ppo": ppo, "eval": ev}


# -----------------------------------------------------------------------------
# the annotators

@functools.lru_cache(maxsize=1 << 16)  # every evaluation judges the same answers against many repeated responses
def edit_distance(a, b):
    # Levenshtein distance between two strings, one row at a time
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def prefer(record, a, b):
    """The gold annotator's preference of response a over b: 1.0 (a better), 0.0 (b better) or 0.5 (tie).
    The correct one wins; otherwise the one closer to the right answer (edit distance); otherwise a tie.
    Length on its own decides nothing, in either direction."""
    truth, a, b = answer(record), normalize(a), normalize(b)
    if (a == truth) != (b == truth):
        return float(a == truth)
    da, db = edit_distance(a, truth), edit_distance(b, truth)
    return 0.5 if da == db else float(da < db)


def prefer_biased(record, a, b, u, length_bias):
    """The training annotator before label noise: if u < length_bias and the lengths differ, the longer
    response (in characters) wins; otherwise the gold judgment. u is a uniform draw in [0, 1)."""
    la, lb = len(normalize(a)), len(normalize(b))
    if u < length_bias and la != lb:
        return float(la > lb)
    return prefer(record, a, b)


def label_pairs(records, outputs_1, outputs_2, length_bias=0.0, noise=0.25, seed=0):
    """AlpacaFarm-style labels by the training annotator: 1 if output_1 is preferred, 2 if output_2. A tie is
    a coin flip, and every label is flipped with probability `noise`."""
    assert len(records) == len(outputs_1) == len(outputs_2), "records and outputs must have the same length"
    rng, labels = random.Random(seed), []
    for rec, a, b in zip(records, outputs_1, outputs_2):
        u_bias, u_tie, u_flip = rng.random(), rng.random(), rng.random()  # three draws always: stable streams
        p = prefer_biased(rec, a, b, u_bias, length_bias)
        first = p == 1.0 or (p == 0.5 and u_tie < 0.5)
        labels.append(2 - (first != (u_flip < noise)))
    return labels


def verdicts(records, outputs, references):
    """The gold annotator's verdict per prompt: 1 (output wins), 0 (reference wins), 1/2 (tie)."""
    assert len(records) == len(outputs) == len(references), "records, outputs, references: lengths differ"
    return [prefer(rec, o, r) for rec, o, r in zip(records, outputs, references)]


def win_rate(records, outputs, references):
    """Win rate of outputs against references (tie = 1/2) and its standard error over prompts, in [0, 1]."""
    return mean_se(verdicts(records, outputs, references))


def paired_difference(records, outputs, baseline, references):
    """Win rate of outputs minus that of baseline, both against the references, and the standard error of the
    per-prompt differences: the same prompts judged twice, so what they share cancels."""
    a, b = verdicts(records, outputs, references), verdicts(records, baseline, references)
    return mean_se([x - y for x, y in zip(a, b)])


def mean_se(xs):
    """Mean and standard error: sample standard deviation (n - 1 denominator) / sqrt(n); nan for n < 2."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
