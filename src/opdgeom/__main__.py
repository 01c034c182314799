import gc
import sys

# Importing torch and transformers' model classes makes ~400k long-lived objects, and with the default
# third threshold (10) the cyclic collector makes a full pass over all of them each time they grow by a
# quarter: six passes, ~0.5 s of a training job's ~4 s start-up (issue 28). At 100 a full pass waits for
# ten times as many young-generation passes; young cycles are collected as before, and a step's models
# are freed by reference counting, not by the collector. Set on import, before any step's lazy imports.
gc.set_threshold(*gc.get_threshold()[:2], 100)

from opdgeom.cli import main  # noqa: E402


def run(argv: list[str] | None = None) -> int:
    """``main`` as the whole life of a process. At exit the interpreter's own passes over those objects
    took ~0.9 s more; frozen objects are skipped by them, while atexit handlers, stream flushes and
    reference-count finalisation still run."""
    status = main(argv)
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(run())
