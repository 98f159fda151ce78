"""One clear line per error for bundle runs: the innermost error of the project, not MONAI's wrapper traceback.

``python -m monai.bundle run ...`` evaluates every config expression inside MONAI's resolver, which wraps an
error in ``RuntimeError: Failed to evaluate ConfigExpression`` (18-52 frames). :func:`install_error_hook`
(the first ``initialize`` entry of every config) replaces ``sys.excepthook`` so that an uncaught error prints
one line, ``error: <what went wrong>``, naming the file / key / setting and what was expected (the message of
the innermost error of the chain), then exits with status 1. The full traceback goes to the log file given to
the hook; ``DDCORE_DEBUG=1`` prints it on the terminal as well.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from types import TracebackType

__all__ = ["DEBUG_ENV", "error_line", "innermost_error", "install_error_hook"]

logger = logging.getLogger(__name__)

#: Environment variable that prints the full traceback of a failing bundle run on the terminal.
DEBUG_ENV = "DDCORE_DEBUG"

_WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "Component to instantiate must", "applying transform")


def _is_wrapper(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(str(err).startswith(w) for w in _WRAPPERS)


def innermost_error(err: BaseException) -> BaseException:
    """The error worth reporting in a chain of wrapped errors (``raise ... from err`` / raised while handling it).

    MONAI's wrappers (``RuntimeError: Failed to evaluate/instantiate ...``, ``applying transform ...``) are
    skipped; of the others the outermost wins: the project raises its clear messages ``from`` the lower-level
    error they explain (a ``ValueError`` naming the checkpoint from torch's unpickling error), and MONAI's own
    config errors (e.g. a missing reference) are not wrapped.

    Args:
        err: the uncaught error.

    Returns:
        The innermost meaningful error.
    """
    chain, seen = [err], {id(err)}
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    meaningful = [e for e in chain if not _is_wrapper(e)]
    return meaningful[0] if meaningful else chain[-1]


def error_line(err: BaseException) -> str:
    """``error: <Type>: <message on one line>`` for :func:`innermost_error` of ``err``'s chain.

    Args:
        err: the uncaught error.

    Returns:
        One line (newlines of the message joined with ``" | "``).
    """
    inner = innermost_error(err)
    message = " | ".join(part.strip() for part in str(inner).strip().splitlines() if part.strip())
    if isinstance(inner, KeyError) and message.startswith(("'", '"')):
        message = f"missing key {message}"
    name = type(inner).__name__
    return f"error: {name}: {message}" if message else f"error: {name}"


def install_error_hook(log_file: str | os.PathLike | None = None) -> bool:
    """Replace ``sys.excepthook`` with the one-line report (idempotent; a config's first ``initialize`` entry).

    Args:
        log_file: where the full traceback of a failing run is written (appended; its folder is created);
            ``None``: only to the ``logging`` error log.

    Returns:
        ``True`` (so it can stand in a config's ``initialize`` list).
    """
    log_path = None if log_file is None else Path(log_file)

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, (KeyboardInterrupt, SystemExit)):
            sys.__excepthook__(kind, err, tb)
            return
        full = "".join(traceback.format_exception(kind, err, tb))
        where = ""
        if log_path is not None:
            try:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(full + "\n")
                where = f" (full traceback in {log_path}; set {DEBUG_ENV}=1 to print it)"
            except OSError:
                where = f" (set {DEBUG_ENV}=1 for the full traceback)"
        else:
            where = f" (set {DEBUG_ENV}=1 for the full traceback)"
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            sys.stderr.write(full)
        sys.stderr.write(error_line(err) + where + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        logging.shutdown()
        # exit now: some native libraries' threads abort the interpreter teardown after an error
        # ("terminate called without an active exception", status 134)
        os._exit(1)

    sys.excepthook = hook
    return True
