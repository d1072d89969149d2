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
def test_every_entry_point_pins_the_kernels_before_torch(entry):
    # 1. the pin is the file's first import, so nothing that imports torch can run before it
    tree = ast.parse(open(os.path.join(ROOT, entry)).read())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    first = [a.name for a in imports[0].names] if isinstance(imports[0], ast.Import) else [imports[0].module]
    if entry == "tests/conftest.py":  # conftest first puts the repository on sys.path
        first = [a.name for n in imports if isinstance(n, ast.Import) and n.names[0].name.startswith("support")
                 for a in n.names]
    assert first == ["support.exact"], f"{entry}: first import is {first}"
    # 2. importing it in a fresh process, with neither variable set, leaves both libraries pinned: torch's own
    # kernels report AVX2, MKL reports strict reproducibility on Intel processors (its default elsewhere)
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    module = entry[:-3].replace("/", ".").replace("tests.", "")
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]; import {module}\n"
            "import torch; torch.ones(8, 8) @ torch.ones(8, 8); print(torch.backends.cpu.get_cpu_capability())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(env, MKL_VERBOSE="1"))
    assert r.returncode == 0, r.stderr
    mkl = "CNR:AUTO,STRICT" if exact.intel_cpu() else "CNR:OFF"
    assert r.stdout.split()[-1] == "AVX2" and mkl in r.stdout, r.stdout[-500:]


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
