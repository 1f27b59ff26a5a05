"""-c given a pickle with code in it: refused in one line that names the file and never advises weights_only=False;
nothing in the file runs. A damaged file still reads as truncated or corrupt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis.eval.__main__ import main as eval_main
from lavis.weights.torch_file import load_torch_file

from .conftest import REPO

CFG = REPO / "lavis/projects/demo/shapes.yaml"


class RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class Foreign:
    pass


def evil_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    marker = tmp_path / "code_ran"
    zipped, legacy = tmp_path / "evil.pth", tmp_path / "evil_legacy.pth"
    torch.save({"llm_proj.bias": torch.zeros(128), "x": RunsCode(marker)}, zipped)
    torch.save({"llm_proj.bias": torch.zeros(128), "x": RunsCode(marker)}, legacy,
               _use_new_zipfile_serialization=False)
    return zipped, legacy, marker


def test_pickled_objects_are_refused_for_safety_not_called_corrupt(tmp_path: Path) -> None:
    zipped, legacy, marker = evil_files(tmp_path)
    foreign = tmp_path / "foreign.pth"
    torch.save({"w": torch.zeros(2), "obj": Foreign()}, foreign)
    for path, what in ((zipped, "posix.system"), (legacy, "posix.system"), (foreign, "Foreign")):
        with pytest.raises(ValueError) as e:
            load_torch_file(path, "model.checkpoint / -c")
        msg = str(e.value)
        assert msg.startswith(f"model.checkpoint / -c: {path} contains pickled objects that are not plain tensors")
        assert what in msg and "refused for safety" in msg and "\n" not in msg
        assert "weights_only" not in msg and "safe_globals" not in msg and "corrupt" not in msg
    assert not marker.exists()
    cut, noise, text = tmp_path / "cut.pth", tmp_path / "noise.pth", tmp_path / "text.pth"
    torch.save({"w": torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:1000])
    noise.write_bytes(bytes([0x80, 0x02, 0x11]) + bytes(range(256)) * 4)  # a pickle header, then an unknown opcode
    text.write_text("hello world, not a weight file")
    for damaged in (cut, noise, text):
        with pytest.raises(ValueError, match=rf"-c: {damaged} \(\d+ bytes\) is not a readable torch file: truncated "
                                             r"or corrupt") as e:
            load_torch_file(damaged, "-c")
        assert "weights_only" not in str(e.value)


def test_eval_with_a_malicious_checkpoint_says_so_in_one_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    zipped, _, marker = evil_files(tmp_path)
    (tmp_path / "q.jsonl").write_text("")
    assert eval_main(["--cfg-path", str(CFG), "-c", str(zipped), "--cpu-only", "--task", "yesno", "--data",
                      str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and str(zipped) in err[0] and "not plain tensors" in err[0]
    assert "weights_only" not in err[0] and not marker.exists()


@pytest.mark.process
def test_cli_demo_with_a_malicious_checkpoint(tmp_path: Path) -> None:
    zipped, _, marker = evil_files(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "cli_demo.py"), "--cfg-path", str(CFG), "-c", str(zipped),
                           "--cpu-only", "--query", "hi"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: model.checkpoint / -c: {zipped} contains pickled objects that are not plain tensors" in proc.stderr
    assert "weights_only" not in proc.stderr and not marker.exists()
