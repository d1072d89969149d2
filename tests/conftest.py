import os
import sys

# The scripts pin torch's CPU kernels to AVX2 before their first kernel runs (train.py, world.py); the tests do
# the same, before any test module runs one, so that what a test builds in this process matches what a script
# builds in a subprocess, bit for bit (torch reads the setting once, at the first kernel).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

# tests import the top-level concept files (llama.py, lora.py, ...) directly
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
