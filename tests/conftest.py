import os
import sys

# tests import the top-level concept files (llama.py, lora.py, ...) directly
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The CPU kernels pinned as the scripts pin them, before any test module runs one, so that what a test builds in
# this process matches what a script builds in a subprocess, bit for bit.
import support.exact  # noqa: E402,F401
