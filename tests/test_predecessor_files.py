"""The predecessors' own files, rebuilt here from their documented layout with tiny widths: a MiniGPT-4 checkpoint as
its LAVIS-style saver writes it (buffers included) loads with the buffers reported as ignored, and MPP-Qwen-Next
``layer_XX-model_states.pt`` directories (no lavis_meta.json) convert with every key accounted for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lavis.config.load import load_config
from lavis.config.presets import preset_path
from lavis.convert.pipe_to_pth import cli, convert
from lavis.predecessors.mpp_layers import LAYER_FILE, read_mpp_dir, select
from lavis.testing.synthetic import TINY_OPTIONS, llm_config_json, write_mpp_pipeline_dir, write_preset
from lavis.weights.base import model_shapes
from lavis.weights.checkpoint import read_checkpoint

from .conftest import recipe_with_options

OPTS = [*TINY_OPTIONS, "model.vision.depth=1"]


def test_minigpt4_saver_checkpoint_loads_with_buffers_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_preset("vicuna0_7b", tmp_path, num_layers=2, vision_depth=1, tiny=True)
    ckpt = files["minigpt4"]
    obj = torch.load(ckpt, weights_only=True)
    assert set(obj) == {"model", "optimizer", "config", "scaler", "epoch"}
    assert "llama_model.model.layers.1.self_attn.rotary_emb.inv_freq" in obj["model"]
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset_path("vicuna0_7b"), OPTS)
    _, report = read_checkpoint(ckpt, model_shapes(cfg.model), num_layers=2)
    assert report.ok, report.format()
    assert sorted(report.loaded) == ["llm_proj.bias", "llm_proj.weight"]
    assert set(report.ignored) == {"Qformer.bert.embeddings.position_ids",
                                   "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq",
                                   "llama_model.model.layers.1.self_attn.rotary_emb.inv_freq"}
    assert "recomputed from the config" in report.ignored["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    text = report.format()
    assert "other top-level entries not read: config, epoch, optimizer, scaler" in text

    from lavis.chat.engine import ChatEngine  # chat accepts the file (-c)

    engine = ChatEngine.from_files(preset_path("vicuna0_7b"), ckpt, device="cpu", options=OPTS)
    proj = dict(engine.model.named_parameters())["llm_proj.weight"]
    assert torch.equal(proj.detach().float(), obj["model"]["llama_proj.weight"].float())


def _file_keys(tag: Path) -> set[str]:
    keys = set()
    for p in tag.iterdir():
        if LAYER_FILE.fullmatch(p.name):
            keys |= {f"{p.name}:{k}" for k in torch.load(p, weights_only=True)}
    return keys


@pytest.mark.parametrize("model_type,pretrain", [("qwen7b_chat", False), ("qwen14b_chat", True)])
def test_mpp_layer_directory_converts_with_every_key_accounted(model_type: str, pretrain: bool, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write_preset(model_type, tmp_path, num_layers=3, vision_depth=1, tiny=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset_path(model_type), OPTS)
    raw = llm_config_json(model_type, 3, tiny=True)
    run = tmp_path / "lavis/output/run"
    tag = write_mpp_pipeline_dir(run, cfg.model, raw, pretrain=pretrain)
    assert len([p for p in tag.iterdir() if LAYER_FILE.fullmatch(p.name)]) == 1 + 4 + 3 + 3 + pretrain
    assert not (tag / "lavis_meta.json").exists()

    state, origin, report = read_mpp_dir(tag, num_blocks=3)
    keep = select(state, origin, report, cfg.model, "model", include_frozen=False)
    file_keys = _file_keys(tag)
    assert not report.unexpected
    assert set(origin.values()) | set(report.ignored) == file_keys  # every key: written or ignored with a reason
    assert "layer_07-model_states.pt:layer.ln_1.weight" in origin.values()  # block 2 of 3 sits at index 5 + 2
    assert origin["llm_model.model.norm.weight"] == "layer_08-model_states.pt:final_layernorm.weight"
    assert origin["llm_model.lm_head.weight"] == "layer_09-model_states.pt:lm_head.weight"
    assert ("layer_11-model_states.pt:occupy.weight" in report.ignored) == pretrain
    assert any(k.startswith("llm_model.model.layers.2.") for k in keep) and "llm_proj.weight" in keep

    if pretrain:  # MPP's occupy layer: only the projection trained, so pipemodel2pth.py is the wrong converter
        with pytest.raises(ValueError, match=r"only the projection trained.*use pipe_proj2pth\.py"):
            convert(run, "model", model=cfg.model)
    dest = convert(run, "model", model=cfg.model, allow_kind_mismatch=pretrain)  # the run directory: its `latest`
    assert dest == tag / "unfreeze_llm_model.pth"
    sd = torch.load(dest, weights_only=True)
    assert "llm_model.transformer.h.2.attn.c_attn.weight" in sd and "llm_model.transformer.ln_f.weight" in sd
    assert torch.equal(sd["llm_model.transformer.ln_f.weight"],
                       torch.load(tag / "layer_08-model_states.pt", weights_only=True)["final_layernorm.weight"])
    want = model_shapes(cfg.model)
    _, rep = read_checkpoint(dest, want, num_layers=3)
    assert rep.ok and {k for k in want if k.startswith(("llm_model.", "llm_proj."))} == set(rep.loaded)


def test_mpp_converter_cli_and_wrong_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    write_preset("qwen7b_chat", tmp_path, num_layers=2, vision_depth=1, tiny=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset_path("qwen7b_chat"), OPTS)
    tag = write_mpp_pipeline_dir(tmp_path / "pretrain", cfg.model, llm_config_json("qwen7b_chat", 2, tiny=True),
                                 pretrain=True)
    recipe = recipe_with_options(tmp_path / "tiny.yaml", preset_path("qwen7b_chat"), OPTS)
    cli("proj", "pipe_proj2pth.py", ["--ckpt_dir", str(tag), "--cfg-path", str(recipe)])  # its command line
    out = capsys.readouterr().out
    assert "0 unexpected" in out and "zero placeholder Linear" in out  # reasons, grouped
    assert "pipe_proj2pth.py writes the projection only" in out
    assert set(torch.load(tag / "model.pth", weights_only=True)) == {"llm_proj.weight", "llm_proj.bias"}

    with pytest.raises(ValueError, match="MPP-Qwen-Next layer files without our lavis_meta.json"):
        convert(tag, "proj")
    three = load_config(preset_path("qwen7b_chat"), [*OPTS, "model.llm.hf_config.num_hidden_layers=3"])
    with pytest.raises(ValueError, match=r"3-block LLM.*is --model-type"):
        convert(tag, "model", model=three.model)
