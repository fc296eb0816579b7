"""Checked first when ubdcow is imported: its runtime dependencies are installed (issue 21, item 11).

``python -m ubdcow`` run from the source folder by a Python that lacks them prints one line saying what to
do (exit 1); ``import ubdcow`` raises ImportError with the same words.
"""

from __future__ import annotations


def require() -> None:
    """One line, not a traceback, when the runtime dependencies are missing (``python -m ubdcow`` run from the
    source folder with a Python that lacks them): what to do instead."""
    import importlib.util
    import sys

    missing = [name for name in ("construct", "numpy", "tqdm") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    message = (
        f"the Python package{'s' if len(missing) > 1 else ''} {', '.join(missing)} that ubdcow needs "
        f"{'are' if len(missing) > 1 else 'is'} not installed for {sys.executable}: run .venv/bin/ubdcow "
        "(make demo creates .venv), or install ubdcow (pip install .)"
    )
    if sys.argv[:1] == ["-m"]:  # python -m ubdcow: the command line, so one line and exit 1
        print(f"ubdcow: {message}", file=sys.stderr)
        raise SystemExit(1)
    raise ImportError(message)


require()
