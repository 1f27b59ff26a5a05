"""``python -m lavis.inspect`` on every preset's synthetic files (real key names, reduced widths so a forward is
fast), and a wrong-size checkpoint failing with the key, both shapes and the likely cause."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavis.config.presets import model_types
from lavis.inspect import main
from lavis.testing.synthetic import LLM_CONFIGS, TINY_OPTIONS, write_mpp_pretrain, write_preset

REPO = Path(__file__).resolve().parents[1]
OPTS = [*TINY_OPTIONS, "model.vision.depth=1"]


def test_every_preset_has_a_synthetic_layout() -> None:
    assert set(model_types()) >= set(LLM_CONFIGS) == {"qwen7b_chat", "qwen14b_chat", "vicuna0_7b", "vicuna0_13b",
                                                       "qwen2.5_7b_instruct", "qwen3_8b", "llama3.1_8b_instruct",
                                                       "minigpt4_llama2"}


@pytest.mark.parametrize("name", sorted(LLM_CONFIGS))
def test_inspect_forward_passes_on_synthetic_files(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    files = write_preset(name, tmp_path, num_layers=2, vision_depth=1, tiny=True)
    monkeypatch.chdir(tmp_path)  # preset paths are relative to the working directory
    ckpt = next((files[k] for k in ("mpp_sft", "minigpt4") if k in files), None)
    argv = ["--model-type", name, "--forward", "--options", *OPTS] + (["-c", str(ckpt)] if ckpt else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    file_lines = [ln for ln in out.splitlines() if " loaded, " in ln]
    assert len(file_lines) == 2 + ("blip2" in files) + bool(ckpt)  # eva, [blip2], LLM directory, [checkpoint]
    assert all("0 missing, 0 unexpected" in ln and "0 shape-mismatched" in ln for ln in file_lines), out
    assert out.rstrip().endswith("OK")
    assert "finite=True" in out
    if ckpt:
        assert "0 keep the seeded init" in out


@pytest.mark.process
def test_wrong_size_checkpoint_fails_with_key_shapes_and_hint(tmp_path: Path) -> None:
    write_preset("qwen7b_chat", tmp_path, num_layers=1, vision_depth=1, tiny=True)
    bad = write_mpp_pretrain(tmp_path / "model_14b.pth", llm_hidden=5120, qformer_hidden=64)  # MPP-Qwen14B projection
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "lavis.inspect", "--model-type", "qwen7b_chat", "-c", str(bad),
                           "--options", *OPTS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "llm_proj.weight: file [5120, 64] vs model [64, 64]" in proc.stdout
    assert "14B checkpoint on a 7B config" in proc.stdout and proc.stdout.rstrip().endswith("FAILED")
