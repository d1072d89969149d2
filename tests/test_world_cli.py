"""The small world's command lines on bad input: one line naming the flag or file, no traceback, nothing left
behind; and a second build of the same world waits for the first instead of doing the work twice."""
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from world import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def main(capsys, module, *args):
    """module.main(args) in this process (as `python -m module args`, less the start-up): exit status and stderr."""
    code = importlib.import_module(module).main(list(args))
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


@pytest.mark.parametrize("flags, line", [
    (["--sft-steps=-5"], "--sft-steps -5: must be at least 1"),        # was: an untrained world, silently
    (["--n-sft", "0"], "--n-sft 0: must be at least 1"),               # was: ZeroDivisionError deep in stage 3
    (["--p-hard", "2"], "--p-hard 2.0: must be in [0, 1]"),
    (["--rm-holdout", "1"], "--rm-holdout 1.0: must be in (0, 1)"),
    (["--sft-lr", "nan"], "--sft-lr nan: must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),       # was: a whole build, silently
    (["--dim", "63"], "--dim 63: must be a multiple of --n-heads 4"),
    (["--vocab-size", "50", "--n-sft", "100", "--n-pref", "10", "--n-ppo", "10", "--n-eval", "10"],
     "--vocab-size 50: sentencepiece cannot train it on this text (Vocabulary size is smaller than required_chars"),
])
def test_world_build_refuses_bad_sizes_in_one_line(tmp_path, flags, line, capsys):
    r = main(capsys, "world.build", "--out", str(tmp_path / "seed0"), *flags)
    assert r.returncode == 1 and r.stderr.startswith("error: " + line) and r.stderr.count("\n") == 1, r.stderr
    assert os.listdir(tmp_path) == [], "a refused build leaves nothing behind"


@pytest.mark.parametrize("out", ["notes.txt", "notes.txt/seed0"])  # the second as train.py --world-dir notes.txt
def test_world_build_refuses_a_file_as_out(tmp_path, out):
    (tmp_path / "notes.txt").write_text("mine")
    r = run("world.build", "--out", str(tmp_path / out))
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'notes.txt'} is a file, not a directory to build " \
                                             "the world into\n", r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("content, line", [
    ("[1, 2, 3]", "record 0 is not an {instruction, input, output} record with string instruction and output"),
    ('{"output": "x"}', "not a non-empty JSON list of {instruction, input, output} records"),
    ('[{"instruction": "Count from 1 to 3.", "input": ""}]', "record 0 is not an {instruction, input, output}"),
    ('[{"instruction": "x", "input": "", "output": "y"', "malformed JSON"),
])
def test_world_judge_refuses_bad_outputs_in_one_line(tmp_path, content, line, capsys):
    (tmp_path / "out.json").write_text(content)
    r = main(capsys, "world.judge", str(tmp_path / "out.json"))
    assert r.returncode == 1 and r.stderr.startswith(f"error: {tmp_path / 'out.json'}") and line in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("records, line", [
    ([1, 2], "record 0 is not an {instruction, input, output} record"),
    ([{"instruction": "x", "input": "", "output": "y"}], "record 0 names no task of the world"),
    ([], "not a non-empty JSON list"),
])
def test_world_judge_refuses_a_bad_world_in_one_line(tmp_path, records, line, capsys):
    """The world's own evaluation file, checked as the outputs are (each case was a traceback)."""
    (tmp_path / "w" / "data").mkdir(parents=True)
    (tmp_path / "w" / "data" / "eval.json").write_text(json.dumps(records))
    (tmp_path / "out.json").write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}]))
    r = main(capsys, "world.judge", str(tmp_path / "out.json"), "--world", str(tmp_path / "w"))
    assert r.returncode == 1 and r.stderr.startswith(f"error: {tmp_path / 'w' / 'data' / 'eval.json'}") and \
        line in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_second_build_waits_for_the_first(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    (tmp_path / f"seed0.tmp-{other.pid}").mkdir()  # a live process is building tmp_path/seed0
    lines, t = [], time.time()
    assert build.wait_for_other_build(str(tmp_path / "seed0"), lines.append, poll=0.05)
    assert lines == [f"[world] process {other.pid} is building {tmp_path / 'seed0'}; waiting for it to finish"]
    assert other.poll() is not None and time.time() - t >= 0.5
    other.wait()
    assert not build.wait_for_other_build(str(tmp_path / "seed0"), lines.append), "a dead builder is not waited for"


def test_a_build_that_waited_takes_the_world_as_it_was_asked(tmp_path):
    """cfg=None (train.py's call) takes whatever world the other build finished, here one of other sizes."""
    out = tmp_path / "seed0"
    code = (f"import json, os, time; time.sleep(0.5); os.makedirs({str(out)!r}); "
            f"json.dump({{'config': {{'seed': 0, 'n_sft': 64}}}}, open({str(out / 'world.json')!r}, 'w'))")
    other = subprocess.Popen([sys.executable, "-c", code])
    (tmp_path / f"seed0.tmp-{other.pid}").mkdir()
    threading.Thread(target=other.wait).start()  # reaped when it ends, as its own parent would
    paths = build.bootstrap(str(out), 0, None, log=None)
    assert paths["info"] == str(out / "world.json")
