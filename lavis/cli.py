"""How a command-line failure reaches the user: one ``error: ...`` line for user errors, exit status 1.

Every command-line entry point runs its ``main`` through :func:`run_cli` (``train_pipeline.py``'s ranks run through
``lavis.engine.errors.run_rank``, which reports the same way). A *user error* (a bad config value, a missing or
corrupt file, a bad sample: ``ValueError`` and its subclasses such as ``ConfigError``, ``OSError`` such as
``FileNotFoundError``, :class:`InputError` such as ``BadSampleError``) is printed as one line ``error: <message>``
(the message names the file, record or key) and the process exits with status 1; any other exception is a bug and
keeps its traceback. ``LAVIS_TRACEBACK=1`` shows the traceback of user errors too.

This module sits below every package (it imports none of ``lavis``), so any layer's command can use it.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

_PEER_LOSS_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote worker crashing",
)


class InputError(RuntimeError):
    """An error caused by the input (not a ``ValueError`` / ``OSError``) whose message says what to fix."""


def is_user_error(e: BaseException) -> bool:
    """Errors caused by the input (config, files, data), whose message says what to fix: no traceback needed."""
    if is_peer_loss(e):
        return False
    return isinstance(e, (ValueError, OSError, InputError))


def is_peer_loss(e: BaseException) -> bool:
    """True when ``e`` (or what it was raised from) says another rank's process went away."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionError) or (
                isinstance(cur, RuntimeError) and any(m in str(cur) for m in _PEER_LOSS_MARKERS)):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def describe(e: BaseException) -> str:
    """The message the user reads: the exception's own text (it names the file / record / key), or its type when
    the text is empty (``KeyError``'s key is quoted, so it keeps its type name)."""
    text = str(e)
    if not text or isinstance(e, KeyError):
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


def show_traceback(e: BaseException) -> bool:
    """Whether ``e``'s traceback is printed: always for a bug, for a user error only with ``LAVIS_TRACEBACK=1``."""
    return not is_user_error(e) or os.environ.get("LAVIS_TRACEBACK", "") not in ("", "0")


def report(e: BaseException, prefix: str = "") -> str:
    """Print ``e`` to stderr the way the user should read it; returns the one-line form."""
    line = f"error: {prefix}{describe(e)}"
    if show_traceback(e):
        traceback.print_exception(e, file=sys.stderr)
    print(line, file=sys.stderr, flush=True)
    return line


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a command-line ``main``: its return value is the exit status; a user error becomes one ``error:`` line
    and status 1; anything else keeps its traceback."""
    try:
        status = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the top level: report() prints a user error in one line, anything else in full
        report(e)
        sys.exit(1)
    sys.exit(status or 0)
