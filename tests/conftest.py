import os
import sys

# tests import the top-level concept files (llama.py, lora.py, ...) directly
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
