"""The command line: ``python -m ubdcow COMMAND ...`` (also installed as ``ubdcow``).

Exit codes: 0 success; 1 error (bad input, refused operation, I/O error);
2 usage error; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 70 an
internal error (a bug). Commands with their own codes (``check``,
``compare``) document them in their help; with several COW files, ``info``,
``map``, ``check`` and ``compact`` exit with the worst file's code.

Layout: :mod:`.base` holds what every command shares; one module a command or
family (:mod:`.inspect`, :mod:`.create`, :mod:`.merge`, :mod:`.compare`,
:mod:`.change`, :mod:`.du`, :mod:`.compact`, :mod:`.demo`) declares its arguments and handler as a
:class:`~.base.Command`; :mod:`.app` lists them in ``COMMANDS`` and runs them.
"""

from __future__ import annotations

from .app import COMMANDS, build_parser, main, run

__all__ = ["COMMANDS", "build_parser", "main", "run"]
