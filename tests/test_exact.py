"""support/exact.py: every entry point pins the CPU kernels before torch runs one, and the pinned products
depend on the values alone, not on where the operands lie in memory."""
import ast
import os
import subprocess
import sys

import pytest
import torch

from support import exact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["train.py", "sample.py", "world/build.py", "world/judge.py", "tools/sweep.py", "tools/bench.py",
                "tools/tables.py", "tests/conftest.py"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_imports_the_pin_first(entry):
    # the pin is the file's first import, so nothing that imports torch can run before it
    tree = ast.parse(open(os.path.join(ROOT, entry)).read())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    first = [a.name for a in imports[0].names] if isinstance(imports[0], ast.Import) else [imports[0].module]
    if entry == "tests/conftest.py":  # conftest first puts the repository on sys.path
        first = [a.name for n in imports if isinstance(n, ast.Import) and n.names[0].name.startswith("support")
                 for a in n.names]
    assert first == ["support.exact"], f"{entry}: first import is {first}"


# In one fresh process with neither variable set: each entry point, imported anew, sets both; then torch's own kernels
# report AVX2 and MKL reports strict reproducibility on Intel processors (its default elsewhere).
CHECK = """
import importlib, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
for module in {modules!r}:
    for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR"):
        os.environ.pop(name, None)
    for name in [m for m in sys.modules if m == "support.exact" or m in {modules!r}]:
        del sys.modules[name]
    importlib.import_module(module)
    print(module, os.environ.get("ATEN_CPU_CAPABILITY"), os.environ.get("MKL_CBWR"))
import torch
torch.ones(8, 8) @ torch.ones(8, 8)
print(torch.backends.cpu.get_cpu_capability())
"""


def test_importing_an_entry_point_pins_both_libraries():
    modules = [e[:-3].replace("/", ".").replace("tests.", "") for e in ENTRY_POINTS]
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    code = CHECK.format(root=ROOT, tests=os.path.join(ROOT, "tests"), modules=modules)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(env, MKL_VERBOSE="1"))
    assert r.returncode == 0, r.stderr
    cbwr = "AUTO,STRICT" if exact.intel_cpu() else "None"
    lines = [l for l in r.stdout.splitlines() if not l.startswith("MKL_VERBOSE")]
    assert lines == [f"{m} avx2 {cbwr}" for m in modules] + ["AVX2"], r.stdout[-1000:]
    assert ("CNR:AUTO,STRICT" if exact.intel_cpu() else "CNR:OFF") in r.stdout, r.stdout[-500:]


def test_matrix_products_do_not_depend_on_alignment():
    # MKL's default kernels on AVX-512 Intel processors give another last digit when an operand starts at an
    # address that is not a multiple of 64 bytes; pinned, every offset gives the same bits.
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(64, 64, 64), (37, 64, 192), (33, 171, 64), (128, 512, 64)]:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        expected = a @ b
        for offset in range(1, 16):  # floats: 4 to 60 bytes off
            x = torch.empty(m * k + offset)[offset:].view(m, k).copy_(a)
            y = torch.empty(k * n + offset)[offset:].view(k, n).copy_(b)
            assert torch.equal(x @ y, expected), (m, k, n, offset)
