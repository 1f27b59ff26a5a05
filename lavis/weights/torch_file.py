"""Reading one torch weight file (``.pth`` / ``.pt``) safely: ``weights_only=True``, memory-mapped, and errors that
name the file and the config key or flag it came from. Every weight reader (and the converters) opens files here."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


def load_torch_file(path: str | Path, what: str, missing_hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped when it is a zip file) with errors that name the file
    and ``what`` it is (the config key or flag): a directory, a missing, empty, truncated or corrupt file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a directory; give the .pth file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist{missing_hint}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{what}: {path} is empty (0 bytes): an interrupted save or copy? Write it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if (refused := unsafe_pickle_reason(e)) is not None:
            raise ValueError(f"{what}: {path} contains pickled objects that are not plain tensors ({refused}); "
                             f"refused for safety, nothing in it was run. Load only weight files you trust, written "
                             f"by pipemodel2pth.py / pipe_proj2pth.py or as a dict of tensors") from None
        raise _unreadable(what, path, size, e) from e
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise _unreadable(what, path, size, e) from e


def _unreadable(what: str, path: Path, size: int, e: BaseException) -> ValueError:
    text = str(e).strip()
    if text.startswith("Weights only load failed"):  # keep the cause, not torch's advice to load it unrestricted
        found = re.search(r"Unsupported operand [^\n]*", text)
        text = found.group(0) if found else "not a pickle torch can read"
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, KeyError):
        first = f"KeyError: {first}"
    return ValueError(f"{what}: {path} ({size} bytes) is not a readable torch file: truncated or corrupt? "
                      f"Write or copy it again ({first})")


def unsafe_pickle_reason(e: pickle.UnpicklingError) -> str | None:
    """What torch's restricted unpickler (``weights_only=True``) refused, in one sentence ("unsupported GLOBAL
    posix.system ..."), or None when ``e`` is not such a refusal (a damaged file). torch's own advice around it
    (load with ``weights_only=False``, or allow the global) is left out: following it would run the file's code.
    An unknown opcode ("Unsupported operand") is damage, not a refusal."""
    text = str(e)
    if not text.startswith("Weights only load failed"):
        return None
    found = re.search(r"(Trying to load unsupported GLOBAL|Unsupported global:)([^\n]*?)\.(?:\s|$)", text)
    return None if found is None else " ".join((found.group(1) + found.group(2)).split())
