"""The whole loop on the real Qwen-7B-Chat layout (synthetic files with the real key names, tiny widths): the SFT
recipe trains with 2 stages from files in MPP-Qwen's cache/ckpt layout plus MPP's pretrain model.pth, each rank
loading its own tensors; the converter writes MPP-Qwen's Qwen v1 names; inspect accepts the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis.testing.synthetic import TINY_OPTIONS, write_preset

from .conftest import REPO

RECIPE = REPO / "lavis/projects/qwen7b/sft_video_8x3090.yaml"


@pytest.mark.process
def test_sft_recipe_on_qwen_v1_layout_trains_converts_and_inspects(tiny_data: Path, tmp_path: Path) -> None:
    files = write_preset("qwen7b_chat", tmp_path, num_layers=2, vision_depth=2, tiny=True)
    opts = [*TINY_OPTIONS, "model.vision.depth=2", "model.qformer.dropout=0.0",
            f"model.checkpoint={files['mpp_pretrain'].relative_to(tmp_path)}",
            f"data.train=[{{ann_path: {tiny_data / 'train.json'}, vis_root: {tiny_data}}}]",
            "data.max_txt_len=320", "data.num_video_frames=2", "data.num_workers=0",
            "train.precision=fp32", "train.optim.zero_stage=0", "train.optim.offload_optimizer=false",
            "train.batch.micro_batch_size=2",
            "train.batch.grad_accum_steps=2", "train.optim.warmup_steps=1",
            "train.parallel.activation_checkpoint_interval=0",
            "train.parallel.gpu_memory_gib=null"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train_pipeline.py"), "--cfg-path", str(RECIPE), "--num-stages", "2", "--max-steps", "2",
           "--output-dir", "out", "--options", *opts]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(ln) for ln in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)

    conv = subprocess.run([sys.executable, str(REPO / "pipemodel2pth.py"), "--ckpt-dir", "out"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-4000:]
    state = torch.load(tmp_path / "out/unfreeze_llm_model.pth", weights_only=True)
    assert "llm_model.transformer.h.0.attn.c_attn.weight" in state  # MPP-Qwen's names for a Qwen v1 model
    assert {"llm_model.transformer.wte.weight", "llm_model.transformer.ln_f.weight", "llm_model.lm_head.weight",
            "llm_proj.weight"} <= set(state)
    assert not any(".model.layers." in k for k in state)
    mpp = torch.load(files["mpp_pretrain"], weights_only=True)
    assert not torch.equal(state["llm_proj.weight"].float(), mpp["llm_proj.weight"].float())  # it trained from it

    ins = subprocess.run([sys.executable, "-m", "lavis.inspect", "--model-type", "qwen7b_chat", "-c",
                          "out/unfreeze_llm_model.pth", "--options", *TINY_OPTIONS, "model.vision.depth=2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ins.returncode == 0, ins.stdout[-3000:] + ins.stderr[-3000:]
    line = next(ln for ln in ins.stdout.splitlines() if "unfreeze_llm_model.pth:" in ln)
    assert " 0 missing, 0 unexpected" in line and " 0 shape-mismatched" in line, line


def test_chat_loads_base_files_and_mpp_sft_checkpoint_with_mangled_names(tmp_path: Path, monkeypatch) -> None:
    """cli_demo's loader on MPP-Qwen's 7B SFT release layout: the tuned final norm and LM head, which MPP's own
    loader drops under their mangled names, land on the model; the base weights come from the files."""
    from lavis.config.load import load_config
    from lavis.config.presets import preset_path
    from lavis.data.tokenizer import load_tokenizer
    from lavis.weights.load import load_model

    files = write_preset("qwen7b_chat", tmp_path, num_layers=2, vision_depth=2, tiny=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset_path("qwen7b_chat"), [*TINY_OPTIONS, "model.vision.depth=2"])
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    model = load_model(cfg, files["mpp_sft"], tok, torch.device("cpu"), torch.float32)
    sft = torch.load(files["mpp_sft"], weights_only=True)
    assert torch.equal(model.llm_model.model.norm.weight, sft["llm_model.transformer.final_h.2norm.weight"].float())
    assert torch.equal(model.llm_model.lm_head.weight, sft["llm_model.transformer.lm_head.weight"].float())
    assert torch.equal(model.llm_proj.weight, sft["llm_proj.weight"].float())
    q, k, v = sft["llm_model.transformer.h.1.attn.c_attn.weight"].float().chunk(3)
    attn = model.llm_model.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, q) and torch.equal(attn.k_proj.weight, k)
    assert torch.equal(attn.v_proj.weight, v)
    blip2 = torch.load(files["blip2"], weights_only=True)["model"]
    assert torch.equal(model.query_tokens, blip2["query_tokens"].float())  # base weights from the BLIP-2 file
