"""Converters and predecessor directories against careless use, on the predecessors' own layouts built here:

- no output of ``pipemodel2pth.py`` / ``pipe_proj2pth.py`` may be one of its inputs (``--out`` over a layer file, the
  metadata, ``latest``, the recipe, a hard link to one; ``--hf-out`` over a directory holding them);
- an MPP-Qwen-Next layer directory gets the wrong-converter refusal our runs get (its ``occupy`` layer says the LLM
  was frozen);
- ``pipe_proj2pth.py --names minigpt4`` writes MiniGPT-4's ``{"model": {"llama_proj.*"}}`` and reads back equal;
- MiniGPT-v2 checkpoints are refused by name; ``--resume`` on an MPP directory says how to convert it;
- ``cli_demo.py`` exits 1 for input errors.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lavis.config.load import load_config
from lavis.config.presets import preset_path
from lavis.convert.pipe_to_pth import cli, convert, load_plain_state, resolve_tag_dir
from lavis.engine.run_dir import RunDirError, find_resume_tag
from lavis.testing.synthetic import TINY_OPTIONS, llm_config_json, write_mpp_pipeline_dir, write_preset
from lavis.weights.base import model_shapes
from lavis.weights.checkpoint import MINIGPT_V2_REFUSAL, read_checkpoint

from .conftest import recipe_with_options

REPO = Path(__file__).resolve().parents[1]
OPTS = [*TINY_OPTIONS, "model.vision.depth=1"]
ENV = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def tiny_recipe(path: Path, model_type: str) -> Path:
    """A recipe file: the preset at the tiny widths of ``OPTS`` (what a user passes as ``--cfg-path``)."""
    return recipe_with_options(path, preset_path(model_type), OPTS)


def mpp_run(root: Path, *, pretrain: bool, num_layers: int = 2) -> tuple[Path, Path]:
    """An MPP-Qwen-Next run directory (``latest``, ``global_step2181/layer_XX-model_states.pt``) for Qwen-7B-Chat at
    tiny width, and the recipe that describes its model. Call with the current directory at ``root``."""
    write_preset("qwen7b_chat", root, num_layers=num_layers, vision_depth=1, tiny=True)
    cfg = load_config(preset_path("qwen7b_chat"), OPTS)
    run = root / ("pretrain" if pretrain else "sft")
    tag = write_mpp_pipeline_dir(run, cfg.model, llm_config_json("qwen7b_chat", num_layers, tiny=True),
                                 pretrain=pretrain)
    return tag, tiny_recipe(root / "tiny.yaml", "qwen7b_chat")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. no output over an input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["layer", "mp_rank", "latest", "recipe", "hardlink", "symlink"])
def test_out_naming_an_input_is_refused_and_the_input_kept(victim: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tag, recipe = mpp_run(tmp_path, pretrain=True)
    target = {"layer": tag / "layer_00-model_states.pt", "mp_rank": tag / "mp_rank_00_model_states.pt",
              "latest": tag.parent / "latest", "recipe": recipe}.get(victim, tag / "layer_03-model_states.pt")
    out = target
    if victim == "hardlink":
        out = tmp_path / "alias.pth"
        os.link(target, out)
    elif victim == "symlink":
        out = tmp_path / "alias.pth"
        out.symlink_to(target)
    before = digest(target)
    with pytest.raises(ValueError, match=r"^--out \S+ is (\S+, )?an input of this conversion; it would be "
                                         r"overwritten\. Nothing was written: choose another --out$"):
        cli("proj", "pipe_proj2pth.py", ["--ckpt-dir", str(tag.parent), "--cfg-path", str(recipe), "--out", str(out)])
    assert digest(target) == before
    if victim != "recipe":  # the library entry point checks the checkpoint's own files too
        with pytest.raises(ValueError, match="an input of this conversion"):
            convert(tag, "proj", out, model=load_config(recipe).model)
        assert digest(target) == before
    cli("proj", "pipe_proj2pth.py", ["--ckpt-dir", str(tag), "--cfg-path", str(recipe),
                                     "--out", str(tmp_path / "model.pth")])  # a new file is fine
    assert set(torch.load(tmp_path / "model.pth", weights_only=True)) == {"llm_proj.weight", "llm_proj.bias"}


@pytest.mark.process
def test_pipemodel2pth_out_over_a_layer_file_exits_1_in_one_line(tmp_path: Path) -> None:
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        tag, recipe = mpp_run(tmp_path, pretrain=False)
    finally:
        os.chdir(cwd)
    layer = tag / "layer_05-model_states.pt"
    before = digest(layer)
    proc = subprocess.run([sys.executable, str(REPO / "pipemodel2pth.py"), "--ckpt-dir", str(tag), "--cfg-path",
                           str(recipe), "--out", str(layer)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --out {layer} is an input of this conversion; it would be overwritten. Nothing was "
        "written: choose another --out"]
    assert digest(layer) == before and not (tag / "unfreeze_llm_model.pth").exists()


@pytest.mark.parametrize("flag,where", [("--out", "meta"), ("--out", "layer"), ("--hf-out", "tag"),
                                        ("--hf-out", "run"), ("--hf-out", "root")])
def test_our_run_outputs_over_inputs_are_refused(flag: str, where: str, llama_pretrain_run: Path,
                                                 tmp_path: Path) -> None:
    run = llama_pretrain_run
    tag = resolve_tag_dir(run)
    out = {"meta": tag / "lavis_meta.json", "layer": tag / "layer_00-model_states.pt", "tag": tag, "run": run,
           "root": run.parent}[where]
    before = {p: digest(p) for p in tag.iterdir()}
    argv = ["--ckpt-dir", str(run), "--names", "minigpt4"] + (["--out", str(out)] if flag == "--out" else
                                                             ["--hf-out", str(out), "--out", str(tmp_path / "m.pth")])
    with pytest.raises(ValueError, match=rf"^{flag} {out} (is|holds) (\S+, )?an input of this conversion"):
        cli("proj", "pipe_proj2pth.py", argv)
    assert {p: digest(p) for p in tag.iterdir()} == before and not (tmp_path / "m.pth").exists()


# --- 2. MPP directories: the wrong-converter refusal ----------------------------------------------------------------


def test_mpp_pretrain_dir_refuses_pipemodel2pth_and_sft_dir_refuses_pipe_proj2pth(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    pre, recipe = mpp_run(tmp_path, pretrain=True)
    sft = write_mpp_pipeline_dir(tmp_path / "sft", load_config(recipe).model, llm_config_json("qwen7b_chat", 2, True),
                                 pretrain=False)
    with pytest.raises(ValueError, match=r"global_step2181: only the projection trained, so pipemodel2pth\.py would "
                                         r"write a projection-only unfreeze_llm_model\.pth; use pipe_proj2pth\.py"):
        cli("model", "pipemodel2pth.py", ["--ckpt-dir", str(pre.parent), "--cfg-path", str(recipe)])
    assert "MPP-Qwen-Next pretrain run (trained: projection)" in capsys.readouterr().err
    assert not (pre / "unfreeze_llm_model.pth").exists()
    with pytest.raises(ValueError, match=r"also trained llm: those trained weights would be left out; use "
                                         r"pipemodel2pth\.py"):
        cli("proj", "pipe_proj2pth.py", ["--ckpt-dir", str(sft), "--cfg-path", str(recipe)])
    assert "MPP-Qwen-Next SFT run (trained: projection, llm)" in capsys.readouterr().err
    assert not (sft / "model.pth").exists()
    cli("model", "pipemodel2pth.py", ["--ckpt-dir", str(sft), "--cfg-path", str(recipe)])  # the right ones convert
    cli("proj", "pipe_proj2pth.py", ["--ckpt-dir", str(pre), "--cfg-path", str(recipe)])
    cli("model", "pipemodel2pth.py", ["--ckpt-dir", str(pre), "--cfg-path", str(recipe), "--allow-kind-mismatch"])
    assert "warning: only the projection trained" in capsys.readouterr().err
    assert (sft / "unfreeze_llm_model.pth").is_file() and (pre / "model.pth").is_file()


# --- 3. back to MiniGPT-4's checkpoint format -----------------------------------------------------------------------


def test_names_minigpt4_is_refused_for_a_non_llama_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tag, recipe = mpp_run(tmp_path, pretrain=True)
    with pytest.raises(ValueError, match=r"--names minigpt4: MiniGPT-4 runs LLaMA / Vicuna, but this run's LLM is "
                                         r"'qwen2'"):
        cli("proj", "pipe_proj2pth.py", ["--ckpt-dir", str(tag), "--cfg-path", str(recipe), "--names", "minigpt4"])
    assert not (tag / "model.pth").exists()
    with pytest.raises(SystemExit):  # the LLM converter has no such format: a malformed command line
        cli("model", "pipemodel2pth.py", ["--ckpt-dir", str(tag), "--names", "minigpt4"])


@pytest.fixture(scope="module")
def llama_pretrain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A projection-only run of ours on a LLaMA-architecture LLM (the demo pretrain recipe's widths), its
    ``global_step1`` written as train_pipeline.py writes it."""
    from .conftest import PRETRAIN_CFG
    from .test_errors import _fake_checkpoint

    root = tmp_path_factory.mktemp("llama")
    recipe = root / "llama_pretrain.yaml"
    llama = {"llm": {"hf_config": {"model_type": "llama"}}}
    recipe.write_text(yaml.safe_dump({"base": str(PRETRAIN_CFG), "model": llama}))
    run = root / "run"
    _fake_checkpoint(run, recipe)
    return run


def test_names_minigpt4_writes_minigpt4_checkpoint_that_reads_back_equal(llama_pretrain_run: Path,
                                                                         tmp_path: Path) -> None:
    run = llama_pretrain_run
    cli("proj", "pipe_proj2pth.py", ["--ckpt-dir", str(run), "--names", "minigpt4", "--out",
                                     str(tmp_path / "pretrained_minigpt4.pth")])
    obj = torch.load(tmp_path / "pretrained_minigpt4.pth", map_location="cpu", weights_only=True)
    assert list(obj) == ["model"] and sorted(obj["model"]) == ["llama_proj.bias", "llama_proj.weight"]
    ours, meta = load_plain_state(resolve_tag_dir(run))
    assert all(v.dtype == torch.float32 for v in obj["model"].values())
    assert torch.equal(obj["model"]["llama_proj.weight"], ours["llm_proj.weight"].float())

    class MiniGPT4(torch.nn.Module):  # MiniGPT-4's `ckpt:` loading: torch.load(path)["model"], strict=False
        def __init__(self, out_dim: int, in_dim: int) -> None:
            super().__init__()
            self.llama_proj = torch.nn.Linear(in_dim, out_dim)
            self.query_tokens = torch.nn.Parameter(torch.zeros(1, 8, in_dim))

    m = MiniGPT4(*ours["llm_proj.weight"].shape)
    msg = m.load_state_dict(obj["model"], strict=False)
    assert msg.unexpected_keys == [] and msg.missing_keys == ["query_tokens"]
    assert torch.equal(m.llama_proj.bias.detach(), ours["llm_proj.bias"].float())

    from lavis.config.load import from_dict
    from lavis.config.schema import ModelConfig

    cfg = from_dict(ModelConfig, meta["config"]["model"], source="lavis_meta.json", prefix="model.")
    got, report = read_checkpoint(tmp_path / "pretrained_minigpt4.pth", model_shapes(cfg))  # our predecessor reader
    assert report.ok and sorted(report.loaded) == ["llm_proj.bias", "llm_proj.weight"]
    assert all(torch.equal(got[k], ours[k].float()) for k in got)


# --- 4. MiniGPT-v2 checkpoints are refused by name -----------------------------------------------------------------


def write_minigpt_v2(path: Path, hidden: int, num_layers: int, rank: int = 4, peft_adapter_names: bool = True) -> Path:
    """A MiniGPT-v2 checkpoint as its runner's ``_save_checkpoint`` writes it (the state dict minus frozen
    parameters): ``llama_proj`` reading 4 concatenated ViT-g tokens (4 x 1408 = 5632 wide; no Q-Former) and the LoRA
    adapters ``get_peft_model`` puts on q_proj / v_proj of every LLaMA-2 block (``.default`` is peft's adapter name
    inside a module's state dict; the released file has the same keys)."""
    g = torch.Generator().manual_seed(0)
    model = {"llama_proj.weight": torch.randn(hidden, 4 * 1408, generator=g), "llama_proj.bias": torch.zeros(hidden)}
    adapter = ".default" if peft_adapter_names else ""
    for i in range(num_layers):
        for proj in ("q_proj", "v_proj"):
            p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            model[f"{p}.lora_A{adapter}.weight"] = torch.randn(rank, hidden, generator=g)
            model[f"{p}.lora_B{adapter}.weight"] = torch.zeros(hidden, rank)
    config = {"model": {"arch": "minigpt_v2", "model_type": "pretrain", "image_size": 448, "lora_r": 64,
                        "lora_alpha": 16, "chat_template": True, "end_sym": "</s>"}}
    torch.save({"model": model, "optimizer": {}, "config": config, "scaler": None, "epoch": 0}, path)
    return path


@pytest.mark.parametrize("peft_adapter_names", [True, False])
def test_minigpt_v2_checkpoint_is_refused_by_name(peft_adapter_names: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_preset("minigpt4_llama2", tmp_path, num_layers=2, vision_depth=1, tiny=True)
    cfg = load_config(preset_path("minigpt4_llama2"), OPTS)
    hidden = int(llm_config_json("minigpt4_llama2", 2, tiny=True)["hidden_size"])
    ckpt = write_minigpt_v2(tmp_path / "minigptv2_checkpoint.pth", hidden, 2, peft_adapter_names=peft_adapter_names)
    with pytest.raises(ValueError) as e:
        read_checkpoint(ckpt, model_shapes(cfg.model), num_layers=2)
    assert str(e.value).startswith(f"{ckpt}: {MINIGPT_V2_REFUSAL}: it holds MiniGPT-v2's LLM LoRA adapters "
                                   "(llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A")
    assert "unexpected" not in str(e.value)


# --- 5. --resume on an MPP directory --------------------------------------------------------------------------------


def test_resume_on_mpp_dir_says_how_to_convert_and_the_command_works(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tag, recipe = mpp_run(tmp_path, pretrain=True)
    run = tag.parent
    for kwargs in ({"require": True, "resume_from": None}, {"require": False, "resume_from": None},
                   {"require": True, "resume_from": "global_step2181"}):
        with pytest.raises(ValueError, match=r"is an MPP-Qwen checkpoint directory .* convert it: `python "
                                             r"pipe_proj2pth\.py --ckpt-dir .*global_step2181 --cfg-path "
                                             r"YOUR_MODEL_RECIPE`, then use it as `model\.checkpoint`"):
            find_resume_tag(run, **kwargs)
    with pytest.raises(ValueError, match="MPP-Qwen checkpoint directory"):
        find_resume_tag(tag, require=False, resume_from=None)  # --output-dir naming the global_step directory
    with pytest.raises(ValueError) as e:
        find_resume_tag(run, require=True, resume_from=None)
    message = str(e.value)
    command = message.split("convert it: `python ")[1].split("`")[0].replace("YOUR_MODEL_RECIPE", str(recipe))
    script, *argv = command.split()
    assert script == "pipe_proj2pth.py"
    cli("proj", script, argv)  # the advised command converts the directory
    pth = message.split("--options model.checkpoint=")[1].split("`")[0]
    assert Path(pth) == tag / "model.pth" and Path(pth).is_file()
    _, report = read_checkpoint(pth, model_shapes(load_config(recipe).model), num_layers=2)
    assert report.ok and sorted(report.loaded) == ["llm_proj.bias", "llm_proj.weight"]


def test_resume_on_a_minigpt4_output_dir_points_to_model_checkpoint(tmp_path: Path) -> None:
    from lavis.testing.synthetic import write_minigpt4

    out = tmp_path / "minigpt4_stage2_finetune" / "20231012123"  # MiniGPT-4: output_dir / job id
    for epoch in (0, 2, 10):
        write_minigpt4(out / f"checkpoint_{epoch}.pth", 64, 48, num_layers=1, head_dim=16)
    (out / "log.txt").write_text('{"train_lr": "0.000", "train_loss": "1.234"}\n')
    with pytest.raises(ValueError, match=rf"^{out} is a MiniGPT-4 output directory \(checkpoint_10\.pth\), which this "
                                         rf"trainer cannot resume .*`--options model\.checkpoint={out}/checkpoint_10"
                                         r"\.pth` with another --output-dir$"):
        find_resume_tag(out, require=True, resume_from=None)


def test_an_interrupted_save_of_ours_is_not_taken_for_an_mpp_dir(tmp_path: Path) -> None:
    """Layer files without lavis_meta.json are also what a save of ours killed midway leaves: the usual refusal."""
    tag = tmp_path / "global_step4"
    tag.mkdir()
    torch.save({"llm_proj.weight": torch.zeros(2, 2)}, tag / "layer_00-model_states.pt")
    with pytest.raises(RunDirError, match=r"--resume-from global_step4: .*lavis_meta\.json not found"):
        find_resume_tag(tmp_path, require=True, resume_from="global_step4")


def test_resume_advice_names_the_preset_and_the_sft_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Qwen-7B-Chat SFT directory (32 blocks, no occupy layer): ``pipemodel2pth.py --model-type qwen7b_chat``."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset_path("qwen7b_chat"), OPTS)
    tag = write_mpp_pipeline_dir(tmp_path / "sft", cfg.model, llm_config_json("qwen7b_chat", 32, tiny=True),
                                 pretrain=False, inv_freq=False)
    with pytest.raises(ValueError, match=r"convert it: `python pipemodel2pth\.py --ckpt-dir \S+global_step2181 "
                                         r"--model-type qwen7b_chat`.*model\.checkpoint=\S+unfreeze_llm_model\.pth"):
        find_resume_tag(tag.parent, require=True, resume_from=None)


@pytest.mark.process
def test_train_pipeline_resume_on_mpp_dir_exits_1_without_traceback(tmp_path: Path) -> None:
    """A plain ``python train_pipeline.py`` (one rank, as on one GPU): one ``error:`` line, status 1."""
    from .conftest import DEMO_CFG

    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        tag, _ = mpp_run(tmp_path, pretrain=False)
    finally:
        os.chdir(cwd)
    for extra in (["--resume"], ["--resume-from", "global_step2181"]):
        proc = subprocess.run([sys.executable, str(REPO / "train_pipeline.py"), "--cfg-path", str(DEMO_CFG),
                               "--output-dir", str(tag.parent), *extra], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "is an MPP-Qwen checkpoint directory" in errors[0], proc.stderr[-3000:]
        assert "python pipemodel2pth.py --ckpt-dir" in errors[0] and "model.checkpoint=" in errors[0]
        assert not (tag.parent / "metrics.jsonl").exists() and not (tag / "lavis_meta.json").exists()


# --- 7. cli_demo.py: input errors exit 1 ----------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("case", ["minigpt_v2_checkpoint", "missing_image", "bad_config"])
def test_cli_demo_input_errors_exit_1_in_one_line(case: str, tmp_path: Path) -> None:
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        write_preset("minigpt4_llama2", tmp_path, num_layers=2, vision_depth=1, tiny=True)
    finally:
        os.chdir(cwd)
    hidden = int(llm_config_json("minigpt4_llama2", 2, tiny=True)["hidden_size"])
    v2 = write_minigpt_v2(tmp_path / "minigptv2_checkpoint.pth", hidden, 2)
    (tmp_path / "bad.yaml").write_text(f"base: {preset_path('minigpt4_llama2')}\nmodel: {{llm: {{no_such_key: 1}}}}\n")
    args = {"minigpt_v2_checkpoint": ["--model-type", "minigpt4_llama2", "-c", str(v2), "--image", "a.png"],
            "missing_image": ["--model-type", "minigpt4_llama2", "--image", str(tmp_path / "missing.png")],
            "bad_config": ["--cfg-path", str(tmp_path / "bad.yaml")]}[case]
    proc = subprocess.run([sys.executable, str(REPO / "cli_demo.py"), "--cpu-only", *args, "--query", "What is it?",
                           "--options", *OPTS], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    want = {"minigpt_v2_checkpoint": MINIGPT_V2_REFUSAL, "missing_image": "missing.png",
            "bad_config": "no_such_key"}[case]
    assert want in errors[0]
