"""Which server-side files a front end may read for a client: ``--allow-local-files DIR`` and the admission check.

A front end that takes file names from a client (the web UI's ``FileData`` paths, the API's local image/video paths)
reads a file only if its real path (symlinks and ``..`` resolved) lies inside one of its readable folders: the
front end's own upload folder, or a folder the operator named with ``--allow-local-files``. The check looks only at
the name, before the file is touched, so a refusal says nothing about whether the file exists or decodes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def add_local_files_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-local-files", metavar="DIR", action="append", default=[],
                   help=f"let clients name image/video files under DIR ({what}); repeat the flag or give a comma "
                        "list for several folders (default: none)")


def local_dirs(values: Iterable[str]) -> list[Path]:
    """``--allow-local-files`` values (each possibly a comma list) -> resolved folders; ``ValueError`` names a value
    that is not an existing folder."""
    dirs = []
    for value in values:
        for item in filter(None, (s.strip() for s in value.split(","))):
            path = Path(item).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"--allow-local-files {item}: not a folder")
            dirs.append(path)
    return dirs


def admitted(name: str | Path, roots: Sequence[Path]) -> Path | None:
    """The real path of ``name`` if it lies inside one of ``roots`` (resolved folders), else None. Decided by the
    name alone (symlinks are followed, nothing is opened or read)."""
    real = Path(os.path.realpath(name))
    return real if any(real.is_relative_to(root) for root in roots) else None
