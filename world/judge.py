"""
The small world's gold annotator as a judge of outputs: the win rate of a train.py OUT/eval/stepNNNN.json
(AlpacaEval's JSON list) against the world's reference outputs, and optionally the gain over another such file,
paired by prompt.

    python -m world.judge out/run/eval/step0010.json --against out/run/eval/step0000.json
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130

import os
import sys

from support import config, exits
from support.files import read_json
from world.build import LAYOUT
from world.tasks import TASKS, paired_difference, win_rate


def read_outputs(file):
    """An AlpacaEval JSON list of {instruction, input, output} records; anything else is one ValueError naming
    the file and the first bad record."""
    outs = read_json(file)
    if not isinstance(outs, list) or not outs:
        raise ValueError(f"{file}: not a non-empty JSON list of {{instruction, input, output}} records")
    for i, o in enumerate(outs):
        if not (isinstance(o, dict) and isinstance(o.get("instruction"), str) and isinstance(o.get("output"), str)):
            raise ValueError(f"{file}: record {i} is not an {{instruction, input, output}} record with string "
                             f"instruction and output")
    return outs


def judge(outputs_file, eval_file, baseline_file=None):
    """The gold annotator's verdict on a file of outputs (AlpacaEval's JSON list, as train.py writes into
    OUT/eval/) for the world's evaluation prompts, and optionally against another such file, paired by prompt."""
    files = [outputs_file] + ([baseline_file] if baseline_file else [])
    outputs = [read_outputs(file) for file in files]  # the files given are checked first, then the world's
    records = read_outputs(eval_file)  # the world's prompts with their reference outputs: the same shape
    if bad := [i for i, r in enumerate(records) if r.get("task") not in TASKS]:
        raise ValueError(f"{eval_file}: record {bad[0]} names no task of the world ({', '.join(TASKS)})")
    texts = []
    for file, outs in zip(files, outputs):
        if [(o["instruction"], o.get("input") or "") for o in outs] != [(r["instruction"], r.get("input") or "")
                                                                        for r in records]:
            raise ValueError(f"{file} does not hold outputs for the prompts of {eval_file}, in their order")
        texts.append([o["output"] for o in outs])
    refs = [r["output"] for r in records]
    win, se = win_rate(records, texts[0], refs)
    print(f"{outputs_file}: gold win rate {100 * win:.1f}% ± {100 * se:.1f} against the reference outputs "
          f"({len(records)} prompts)")
    if baseline_file:
        d, d_se = paired_difference(records, texts[0], texts[1], refs)
        print(f"against {baseline_file}: {100 * d:+.1f} ± {100 * d_se:.1f} points, paired by prompt")


def main(argv=None):
    p = config.Parser(description="Judge outputs for the small world's held-out prompts with its gold "
                                            "annotator.")
    p.add_argument("outputs", help="a train.py OUT/eval/stepNNNN.json")
    p.add_argument("--against", metavar="BASELINE", help="a second outputs file, paired by prompt")
    p.add_argument("--world", default=".world/seed0", help="the world whose evaluation prompts they answer")
    args = p.parse_args(argv)
    try:
        judge(args.outputs, os.path.join(args.world, LAYOUT["eval"]), args.against)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(exits.script(main))
