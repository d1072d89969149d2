"""The layout as a reader meets it: the top-level files are the lesson and import only each other (no cycle, nothing
from tools/ or world/: support/data.py builds the world), and the README fits a screen and runs as shown."""
import ast
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))   # the lesson: llama, lora, ..., train


def imported(file):
    """Every module a file imports, anywhere in it (functions and `__main__` too): `import a.b` gives a.b;
    `from a import b` gives a and a.b, since b may be a module."""
    with open(os.path.join(ROOT, file)) as f:
        tree = ast.parse(f.read(), file)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def cycle(graph):
    """A list of nodes that closes a cycle (first node repeated at the end), or None; depth-first search."""
    state, path = {}, []

    def visit(n):
        state[n] = "open"
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        path.pop()
        return None
    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_import_cycle_among_the_top_level_files():
    graph = {m: {n.split(".")[0] for n in imported(m + ".py")} & set(TOP) - {m} for m in TOP}
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    assert "divergences" in graph["gradients"]                      # the edges are seen: gradients uses divergences
    # control: the search finds a cycle of three, and the circle divergences.py's __main__ once closed
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({**graph, "divergences": graph["divergences"] | {"gradients"}}) is not None


def test_the_lesson_imports_nothing_from_tools_or_world():
    found = {(m + ".py", n) for m in TOP for n in imported(m + ".py") if n.split(".")[0] in ("tools", "world")}
    assert not found, sorted(found)
    # the small world is reached from train.py through support/data.py's one named call (data.small_world)
    assert "world.build" in imported(os.path.join("support", "data.py")) or \
        "world" in imported(os.path.join("support", "data.py"))


README = os.path.join(ROOT, "README.md")


def test_readme_fits_a_screen():
    with open(README) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines, at most 200"
    wide = [(i + 1, len(line)) for i, line in enumerate(lines) if len(line) > 120]
    assert not wide, f"README.md lines wider than 120 columns (line, width): {wide}"


def commands(text):
    """The `python ...` and `torchrun ...` commands of the README: each line of a fenced code block, `$ ` and
    `time ` prompts removed, and each inline code span that starts with one."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    lines = [l.split(" #")[0].strip() for b in blocks for l in b.splitlines()]
    lines += re.findall(r"`((?:python|torchrun) [^`]*)`", text)
    out = []
    for line in lines:
        line = re.sub(r"^(\$ )?(time )?", "", line).rstrip("\\ ")
        if line.split(" ")[0] in ("python", "python3", "torchrun"):
            out.append(line)
    return out


def target(cmd):
    """The file a command runs: python FILE, python -m MODULE (its .py or package), torchrun [--opts] FILE."""
    words = shlex.split(cmd)[1:]
    while words and words[0].startswith("-") and words[0] != "-m":
        words = words[1:]                                          # torchrun's and python's own options
    if words[0] == "-m":
        path = os.path.join(ROOT, *words[1].split("."))
        return next((p for p in (path + ".py", os.path.join(path, "__main__.py")) if os.path.exists(p)), path + ".py")
    return os.path.join(ROOT, words[0])


def test_every_readme_command_names_a_file_that_exists():
    with open(README) as f:
        cmds = commands(f.read())
    # the commands a reader copies first are found (so the check below is not vacuous)
    runs = {os.path.relpath(target(c), ROOT) for c in cmds}
    assert {"train.py", os.path.join("world", "judge.py"), os.path.join("tools", "sweep.py")} <= runs, runs
    missing = [c for c in cmds if not os.path.isfile(target(c))]
    assert not missing, f"README commands whose file does not exist: {missing}"
    # control: the old spelling of the judge names no file
    assert not os.path.isfile(target("python world.py --judge out/run/eval/step0010.json"))


def test_the_lesson_fits_its_budget():
    """The top-level files (the reading path) total at most 1,900 lines, and none of their functions is longer than
    60 lines: what does not fit is an operation, and lives in a folder named by its role."""
    total, long = 0, []
    for m in TOP:
        with open(os.path.join(ROOT, m + ".py")) as f:
            text = f.read()
        total += len(text.splitlines())
        long += [(m, n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert total <= 1900, f"the top-level files hold {total} lines, at most 1,900"
    assert not long, f"functions over 60 lines: {long}"
    assert sorted(TOP) == sorted(["llama", "lora", "divergences", "gradients", "reward", "ppo", "train", "sample",
                                  "checkpoints"])


ENTRY_POINTS = ("train", "sample", "world.build", "world.judge", "tools.sweep", "tools.bench", "tools.tables")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_refuses_an_unknown_flag_in_one_line(module, capsys):
    """argparse's error, in every script: the one line `prog: error: ...` (exit status 2), not the usage block."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error: " in err, err  # (or a missing required one)


@pytest.mark.parametrize("failure, code, line", [
    (KeyboardInterrupt, 130, "interrupted (SIGINT)\n"),
    (ValueError("--x must be positive"), 1, "error: --x must be positive\n"),
    (OSError(28, "No space left on device", "out.json"), 1, "error: [Errno 28] No space left on device: 'out.json'\n"),
    (BrokenPipeError, 1, ""),  # a closed stdout (`| head`): quietly
])
def test_a_tool_ends_in_one_line(failure, code, line, capsys):
    """support/exits.script, the tools' entry point: Ctrl-C, bad input and a full disk each end in one line."""
    import signal
    from support import exits

    def main():
        raise failure
    before = signal.getsignal(signal.SIGINT)
    stdout = os.dup(1)
    try:
        assert exits.script(main) == code
    finally:
        os.dup2(stdout, 1)  # (the broken-pipe case points fd 1 at /dev/null)
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err == line
