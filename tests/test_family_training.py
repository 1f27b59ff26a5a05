"""Every shipped model family trains, converts and chats: its recipe (or model preset) at tiny width on the
predecessors' file layout, with the family's real tokenizer where we have one (Meta's LLaMA ``tokenizer.model`` for
Vicuna v0 and LLaMA-2, ``qwen.tiktoken`` for Qwen v1; synthetic ``tokenizer.json`` files with the families' special
tokens for Qwen2.5, Qwen3 and Llama-3): 2 pipeline stages on 2 CPU ranks, 3 steps, the converter
(``pipe_proj2pth.py`` for projection-only recipes, ``pipemodel2pth.py`` when the LLM trains), then one greedy answer
from the converted checkpoint. Pad, end and placeholder ids come from ``ChatTemplate.special_ids``
(never Qwen's ``<|endoftext|>`` where the tokenizer lacks it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lavis.config.presets import preset_path
from lavis.testing.synthetic import TINY_OPTIONS, llm_config_json, write_llm_dir, write_preset

from .conftest import REPO

SHARED = REPO.parent / "shared" / "data"
LLAMA_MODEL = SHARED / "llama_tokenizer.model"
QWEN_TIKTOKEN = SHARED / "qwen.tiktoken"


@dataclass(frozen=True)
class Family:
    preset: str
    recipe: Path
    pad: str
    """The pad token special_ids must choose."""
    tokenizer: Path | None = None
    """A real tokenizer file linked into the LLM directory (None: the synthetic one)."""
    pad_file: dict | None = None
    """``special_tokens_map.json`` written beside the tokenizer (the family's real directory has it)."""
    added: dict | None = None
    """``added_tokens.json`` (Vicuna v0's delta: ``[PAD]`` = 32000), the vocabulary grows to match."""
    sft: bool = False
    """Tune the LLM too (written by ``pipemodel2pth.py``); else projection only (``pipe_proj2pth.py``)."""


MINIGPT4 = REPO / "lavis/projects/minigpt4/vicuna7b_stage2.yaml"
FAMILIES = {
    "vicuna0": Family("vicuna0_7b", MINIGPT4, "</s>", LLAMA_MODEL),
    "vicuna0_pad": Family("vicuna0_7b", MINIGPT4, "[PAD]", LLAMA_MODEL, pad_file={"pad_token": "[PAD]"},
                          added={"[PAD]": 32000}),
    "llama2": Family("minigpt4_llama2", preset_path("minigpt4_llama2"), "</s>", LLAMA_MODEL),
    "qwen7b": Family("qwen7b_chat", REPO / "lavis/projects/qwen7b/pretrain_8x3090.yaml", "<|endoftext|>",
                     QWEN_TIKTOKEN),
    "qwen2.5": Family("qwen2.5_7b_instruct", preset_path("qwen2.5_7b_instruct"), "<|endoftext|>",
                      pad_file={"pad_token": "<|endoftext|>"}, sft=True),
    "qwen3": Family("qwen3_8b", preset_path("qwen3_8b"), "<|endoftext|>", pad_file={"pad_token": "<|endoftext|>"},
                    sft=True),
    "llama3": Family("llama3.1_8b_instruct", preset_path("llama3.1_8b_instruct"), "<|eot_id|>", sft=True),
}


def _layout(fam: Family, root: Path) -> tuple[list[str], Path | None]:
    """The family's files under ``root`` (cache/ckpt layout); returns the tiny-width options and the predecessor's
    checkpoint to start from (MiniGPT-4's for the LLaMA family, MPP's pretrain for Qwen v1)."""
    files = write_preset(fam.preset, root, num_layers=2, vision_depth=2, tiny=True)
    from lavis.config.load import load_config

    llm_dir = root / load_config(preset_path(fam.preset)).model.llm.path
    if fam.tokenizer is not None:
        target = llm_dir / fam.tokenizer.name.replace("llama_tokenizer", "tokenizer")
        target.unlink(missing_ok=True)
        target.symlink_to(fam.tokenizer)
    if fam.added:
        raw = llm_config_json(fam.preset, 2, tiny=True)
        write_llm_dir(llm_dir, {**raw, "vocab_size": raw["vocab_size"] + len(fam.added)})
        (llm_dir / "added_tokens.json").write_text(json.dumps(fam.added))
    if fam.pad_file:
        (llm_dir / "special_tokens_map.json").write_text(json.dumps(fam.pad_file))
    start = files.get("minigpt4") or files.get("mpp_pretrain")
    return [*TINY_OPTIONS, "model.vision.depth=2", "model.qformer.dropout=0.0"], start


@pytest.mark.process
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_recipe_trains_converts_and_chats(name: str, tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fam = FAMILIES[name]
    if fam.tokenizer is not None and not fam.tokenizer.is_file():
        pytest.skip(f"real tokenizer {fam.tokenizer} not found")
    tiny, start = _layout(fam, tmp_path)
    opts = [*tiny, f"model.checkpoint={start.relative_to(tmp_path) if start else 'null'}",
            "model.vision.frozen=true", f"model.llm.frozen={not fam.sft}", "model.projection.frozen=false",
            f"data.train=[{{ann_path: {tiny_data / 'train.json'}, vis_root: {tiny_data}}}]",
            "data.max_txt_len=320", "data.num_video_frames=2", "data.num_workers=0",
            "train.precision=fp32", "train.optim.zero_stage=0", "train.optim.offload_optimizer=false",
            "train.batch.micro_batch_size=2",
            "train.batch.grad_accum_steps=1", "train.optim.warmup_steps=1",
            "train.parallel.activation_checkpoint_interval=0",
            "train.parallel.gpu_memory_gib=null", "train.checkpoint.save_every=0"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_pipeline.py"), "--cfg-path", str(fam.recipe), "--num-stages", "2", "--max-steps", "3",
           "--output-dir", "out", "--options", *opts]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(ln) for ln in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)

    from lavis.chat.engine import ChatEngine, GenerationSettings
    from lavis.convert.pipe_to_pth import cli
    from lavis.weights.release import OUTPUT_NAME

    monkeypatch.chdir(tmp_path)
    kind = "model" if fam.sft else "proj"  # pipemodel2pth.py / pipe_proj2pth.py, in this process (no start-up)
    cli(kind, "", ["--ckpt-dir", "out"])
    pth = OUTPUT_NAME[kind]
    engine = ChatEngine.from_files("out/config.yaml", f"out/{pth}", device="cpu")
    tok, ids = engine.tpl.tokenizer, engine.tpl.special_ids()
    assert Path(tok.source).resolve().parent == tmp_path / "out"  # the run's own copy of the tokenizer
    assert ids.pad == tok.token_id(fam.pad) and ids.pad != ids.placeholder
    assert ids.eos == tok.token_id(engine.tpl.spec.stop_tokens[0]) and engine.pad_id == ids.pad
    image = tiny_data / json.loads((tiny_data / "train.json").read_text())[0]["images"][0]
    answer = engine.generate([engine.make_turn("What shape is this?", [engine.load_media(image)])],
                             GenerationSettings(max_new_tokens=3))
    assert answer.finish_reason in ("stop", "length") and 0 < answer.prompt_tokens
    assert answer.completion_tokens <= 3
