"""Facts the type checker (pyright, `make lint`) relies on, and the bugs it found."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from lavis import plan
from lavis.config.load import load_config
from lavis.config.schema import DatasetConfig
from lavis.data.cache_features import CacheError
from lavis.features import collect_items

from .conftest import PRETRAIN_CFG, REPO


def test_feature_cache_refuses_tar_shard_members_by_name(tmp_path: Path) -> None:
    """Bug found by the type checker: a webdataset record's image is a tar member, which ``os.path.abspath`` cannot
    take; the cache builder died with a TypeError instead of naming the record."""
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k0.png", _png()), ("k0.txt", b"a red card")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = load_config(PRETRAIN_CFG)
    cfg = replace(cfg, data=replace(cfg.data, train=[DatasetConfig(ann_path=str(shard), format="webdataset")]))
    with pytest.raises(CacheError, match=r"00000\.tar.*k0\.png is a member of a tar shard .*extract the shards"):
        collect_items(cfg, 0, [])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.process
@pytest.mark.parametrize("module", ["lavis.config.migrate"])
def test_cli_help_without_docstrings(module: str) -> None:
    """Bug found by the type checker: ``__doc__`` is None under ``python -OO``, and the commands took their
    description from ``__doc__.split(...)``, so ``--help`` died with an AttributeError."""
    res = subprocess.run([sys.executable, "-OO", "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout


def test_plan_help_without_docstrings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The same bug in ``python -m lavis.plan``, checked in-process with its docstring removed: under ``-OO``
    transformers itself does not import (its models' ``auto_docstring`` needs their docstrings), so the planner,
    which imports the model families, cannot start there at all."""
    monkeypatch.setattr(plan, "__doc__", None)
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m lavis.plan" in capsys.readouterr().out
