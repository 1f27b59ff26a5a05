"""How a failure reaches the user in multi-rank runs: one ``error: ...`` line for user errors, and the root cause last.

Every command-line entry point runs its ``main`` through ``lavis.cli.run_cli``; ``train_pipeline.py`` runs through
:func:`run_rank`. A *user error* (a bad config value, a missing or corrupt file, a bad sample: ``ValueError`` and
its subclasses such as ``ConfigError``, ``OSError`` such as ``FileNotFoundError``, ``BadSampleError``) is printed as
one line ``error: <message>`` (the message names the file, record or key) and the process exits with status 1; any
other exception is a bug and keeps its traceback. ``LAVIS_TRACEBACK=1`` shows the traceback of user errors too.

In a multi-rank run the rank that fails first is the root cause; its peers then fail only because it is gone
(gloo: "Connection closed by peer"). :func:`run_rank` keeps those secondary failures quiet:

- the failing rank writes torchrun's error file (``TORCHELASTIC_ERROR_FILE``, the format of
  ``torch.distributed.elastic.multiprocessing.errors``) and prints ``error: rank N: <message>``;
- a rank whose peer vanished prints nothing and waits for the launcher to stop it (torchrun and the ``deepspeed``
  launcher both terminate the remaining ranks as soon as one fails), so it is never recorded as failing before the
  root cause. Only if no launcher stops it within :data:`PEER_LOSS_WAIT_S` does it report the lost connection itself
  (a network failure, or a launcher that does not stop peers).

torchrun's closing summary then names the failing rank under "Root Cause (first observed failure)" with its message,
as the last thing on the console. The ``deepspeed`` launcher has no error file: there the failing rank's
``error:`` line is the last line before the launcher's own "Killing subprocess" / "exits with return code" lines.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

from lavis.cli import describe, is_peer_loss, report, show_traceback

PEER_LOSS_WAIT_S = 60.0
"""How long a rank whose peer vanished waits for the launcher to stop it before reporting the loss itself."""


def write_error_file(e: BaseException, text: str) -> None:
    """Record ``e`` where torchrun looks for a rank's failure (nothing outside torchrun). The JSON layout is the one
    ``torch.distributed.elastic``'s ``ErrorHandler.record_exception`` writes: torchrun's summary prints
    ``py_callstack`` under "Root Cause" and orders failures by ``timestamp``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(e).__name__}: {describe(e)}",
                        "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}
    with open(path, "w") as f:
        json.dump(data, f)


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _fail_as_root_cause(e: BaseException) -> NoReturn:
    prefix = f"rank {_rank()}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    line = report(e, prefix)
    text = "".join(traceback.format_exception(e)) if show_traceback(e) else line
    write_error_file(e, text)
    sys.exit(1)


def _wait_to_be_stopped(e: BaseException) -> NoReturn:
    """A peer vanished: let the launcher stop this rank (SIGTERM) so that the failing rank's error stays the root
    cause; report the loss only if nobody does."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a training loop's graceful-stop handler must not delay this
    deadline = time.monotonic() + PEER_LOSS_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(1.0)
    lost = ConnectionError(f"lost the connection to another rank and no launcher stopped this rank within "
                           f"{PEER_LOSS_WAIT_S:.0f} s; look for the first failing rank's error: {describe(e)}")
    report(lost, f"rank {_rank()}: ")
    write_error_file(lost, "".join(traceback.format_exception(e)))
    sys.exit(1)


def run_rank(main: Callable[[], None]) -> NoReturn:
    """Run one rank of a distributed job (see the module docstring)."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # the top level of a rank: every failure is reported (root cause or peer loss), none hidden
        if is_peer_loss(e) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _wait_to_be_stopped(e)
        _fail_as_root_cause(e)
    sys.exit(0)
