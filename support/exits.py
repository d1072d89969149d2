"""
How train.py ends: bad input and the known failures as one line on stderr and exit status 1 (130 after Ctrl-C or
SIGTERM), instead of a traceback. train.cli calls it.
"""
import sys

import torch

from support import rundir


def one_line(main, argv=None):
    """main(), with bad input and the known failures ending in one line on stderr and exit status 1 (130 after
    Ctrl-C or SIGTERM)."""
    try:
        main(argv)
    except rundir.Interrupted as e:
        print(e, file=sys.stderr)
        return 130  # as a shell reports a process stopped by Ctrl-C
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: a full disk, a vanished file
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; a smaller --micro-batch-size lowers it and changes nothing else (gradients "
              "are accumulated up to --step-batch-size), as does a smaller --max-new-tokens; --dry-run estimates it",
              file=sys.stderr)
        return 1
    finally:
        rundir.release()
    return 0
