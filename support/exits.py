"""
How the scripts end: bad input and the known failures as one line on stderr and exit status 1 (130 after Ctrl-C or
SIGTERM), instead of a traceback. train.cli calls one_line; the tools (world.build, world.judge, tools.*) call script.
"""
import contextlib
import os
import signal
import sys

import torch

from support import rundir


def script(main, interrupted="interrupted (SIGINT)"):
    """A tool's entry point, once torch has loaded: main() with bad input (ValueError, OSError) as one line on stderr
    and status 1, Ctrl-C as the line `interrupted` and 130, and a closed stdout (`| head`) ending it quietly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (support.exact.quiet_interrupt covered the imports)
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:  # as Python's documentation advises: no second error while flushing at exit
        with contextlib.suppress(OSError, ValueError):  # (a stdout that is not a file: nothing to redirect)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def one_line(main, argv=None):
    """main(), with bad input and the known failures ending in one line on stderr and exit status 1 (130 after
    Ctrl-C or SIGTERM)."""
    try:
        main(argv)
    except rundir.Interrupted as e:  # in the loop: stop() said where the last step is; before it, only the signal
        print(e if str(e).startswith("interrupted") else f"interrupted ({e}) before the first PPO step",
              file=sys.stderr)
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
