"""``python -m lavis.config.migrate`` on predecessor YAMLs rebuilt here with the key structure those projects ship
(MPP-Qwen-Next ``lavis/projects/pp_qwen7b_video/*.yaml`` / ``pp_qwen14b/*.yaml``, MiniGPT-4 ``train_configs`` /
``eval_configs``): every key gets a line, the result loads strictly, the 7B SFT schedule matches the original's,
one migrated config trains, and every tool refuses a predecessor YAML with the migrate command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lavis.config.load import ConfigError, load_config, to_dict
from lavis.config.migrate import Args, flatten, main, migrate, mpp_lr, yaml_literal

from .conftest import COMMON, DEMO_CFG, REPO, data_options, launch, losses

_ZERO = {"allgather_partitions": True, "allgather_bucket_size": "2e8", "overlap_comm": True, "reduce_scatter": True,
         "reduce_bucket_size": "2e8", "contiguous_gradients": True}
_FP16 = {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2,
         "min_loss_scale": 1}


def mpp_config(model_type: str, stage: str) -> dict[str, Any]:
    """An MPP-Qwen-Next pipeline config with the keys its files have (values of its 7B / 14B pretrain and SFT)."""
    sft = stage != "pretrain"
    llm = {"qwen7b_chat": "ckpt/Qwen7B-chat", "qwen14b_chat": "ckpt/Qwen-14B-Chat"}[model_type]
    model = {"arch": "minigpt4qwen", "model_type": model_type, "load_finetuned": sft, "load_pretrained": True,
             "pretrained": "ckpt/blip2/blip2_pretrained_flant5xxl.pth",
             "finetuned": "lavis/output/pp_7b_video/pretrain/global_step2181/model.pth" if sft else "",
             "vit_model": "eva_clip_g", "image_size": 224, "drop_path_rate": 0, "use_grad_checkpoint": True,
             "vit_precision": "fp16", "freeze_vit": True, "unfreeze_pos_embed": False, "num_query_token": 32,
             "qformer_text_input": False, "freeze_qformer": True, "freeze_queries": True, "freeze_proj": False,
             "llm_model": llm, "get_lora": False, "lora_alpha": 32, "lora_r": 8, "lora_dropout": 0.05,
             "max_txt_len": {"sft_video": 1536, "sft": 512, "pretrain": 512 if model_type == "qwen7b_chat" else 256}[
                 stage], "enable_autocast": False}
    if sft:
        model["freeze_llm"] = False
    proc = {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": 224}},
            "text_processor": {"train": {"name": "base_instruction", "max_words": 200}}}
    names = {"pretrain": ["llava_pretrain"], "sft_video": ["llava_instruct_156k", "videochatgpt_100k"],
             "sft": ["llava_instruct_100k"]}[stage]
    micro, gas = {("qwen7b_chat", "pretrain"): (8, 8), ("qwen14b_chat", "pretrain"): (1, 256)}.get(
        (model_type, stage), (1, 128))
    out = {("qwen7b_chat", "pretrain"): "pp_7b_video/pretrain", ("qwen7b_chat", "sft_video"): "pp_7b_video/sft_video",
           ("qwen14b_chat", "pretrain"): "pp_14b/pretrain", ("qwen14b_chat", "sft"): "pp_14b/sft_100k"}[
        (model_type, stage)]
    zero = {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}, **_ZERO} if stage == "sft" else \
        {"stage": 0, **_ZERO}
    lr = "2e-5" if sft else "1e-3"
    run = {"output_dir": f"lavis/output/{out}/", "task": "deepspeed_image_text_pretrain", "num_workers": 4, "seed": 42,
           "world_size": 1, "dist_url": "env://", "distributed": True, "max_epoch": 1, "log_freq": 10,
           "lr_sched": "linear_warmup_cosine_lr_step-wise", "warmup_lr": 0, "init_lr": lr, "min_lr": 0,
           "warmup_ratio": 0.1 if sft else 0.03,
           "deepspeed_config": {"gradient_accumulation_steps": gas, "train_micro_batch_size_per_gpu": micro,
                                "gradient_clipping": 1.0, "steps_per_print": 10, "wall_clock_breakdown": False,
                                "dump_state": False, "fp16": dict(_FP16), "bf16": {"enabled": True},
                                "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.99], "eps": "1e-7",
                                                                          "weight_decay": 0.0}},
                                "zero_optimization": zero}}
    return {"model": model, "datasets": {n: proc for n in names}, "run": run}


def minigpt4_config(kind: str) -> dict[str, Any]:
    """MiniGPT-4's train_configs/minigpt4_stage{1,2}*.yaml and eval_configs/minigpt4_eval.yaml key structure."""
    proc = {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": 224}},
            "text_processor": {"train": {"name": "blip_caption"}}}
    run = {"task": "image_text_pretrain", "lr_sched": "linear_warmup_cosine_lr", "warmup_lr": "1e-6",
           "weight_decay": 0.05, "num_workers": 4, "seed": 42, "amp": True, "resume_ckpt_path": None,
           "evaluate": False, "train_splits": ["train"], "device": "cuda", "world_size": 1, "dist_url": "env://",
           "distributed": True, "wandb_log": True}
    if kind == "stage1":
        return {"model": {"arch": "minigpt4", "model_type": "pretrain_vicuna0"},
                "datasets": {"laion": {"batch_size": 64, **proc, "sample_ratio": 115},
                             "cc_sbu": {"batch_size": 64, **proc, "sample_ratio": 14}},
                "run": {**run, "init_lr": "1e-4", "min_lr": "8e-5", "max_epoch": 4, "warmup_steps": 5000,
                        "iters_per_epoch": 5000, "output_dir": "output/minigpt4_stage1_pretrain",
                        "job_name": "minigpt4_pretrain"}}
    model = {"arch": "minigpt4", "model_type": "pretrain_vicuna0", "max_txt_len": 160, "end_sym": "###",
             "prompt_template": "###Human: {} ###Assistant: "}
    if kind == "eval":
        return {"model": {**model, "low_resource": True,
                          "ckpt": "please set this value to the path of pretrained checkpoint"},
                "datasets": {"cc_sbu_align": {"vis_processor": {"train": {"name": "blip2_image_eval",
                                                                          "image_size": 224}},
                                              "text_processor": {"train": {"name": "blip_caption"}}}},
                "run": {"task": "image_text_pretrain"}}
    return {"model": {**model, "prompt_path": "prompts/alignment.txt", "ckpt": "/path/to/stage1/checkpoint/"},
            "datasets": {"cc_sbu_align": {"batch_size": 12, **proc}},
            "run": {**run, "init_lr": "3e-5", "min_lr": "1e-5", "max_epoch": 5, "iters_per_epoch": 200,
                    "warmup_steps": 200, "output_dir": "output/minigpt4_stage2_finetune",
                    "job_name": "minigpt4_finetune"}}


def write(tmp: Path, name: str, cfg: dict[str, Any]) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


CASES = {  # file -> (config, --num-samples)
    "pp_qwen7b_video_pretrain.yaml": (mpp_config("qwen7b_chat", "pretrain"), [558128]),
    "pp_qwen7b_video_sft.yaml": (mpp_config("qwen7b_chat", "sft_video"), [157712, 98900]),
    "pp_qwen14b_pretrain_pp.yaml": (mpp_config("qwen14b_chat", "pretrain"), [558128]),
    "pp_qwen14b_sft_100k_pp.yaml": (mpp_config("qwen14b_chat", "sft"), [100000]),
    "minigpt4_stage1_pretrain.yaml": (minigpt4_config("stage1"), None),
    "minigpt4_stage2_finetune.yaml": (minigpt4_config("stage2"), None),
    "minigpt4_eval.yaml": (minigpt4_config("eval"), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_migrated_config_loads_strictly_with_a_line_per_key(name: str, tmp_path: Path) -> None:
    cfg, counts = CASES[name]
    src = write(tmp_path, name, cfg)
    out = tmp_path / "ours" / "recipe.yaml"
    out.parent.mkdir()
    res = migrate(src, out, Args(num_samples=counts))
    out.write_text(res.text)
    ours = load_config(out)  # strict
    assert ours == res.cfg
    for key in flatten(cfg):
        assert any(line.startswith(f"{key}: ") or line.startswith(f"{key} ->") for line in res.lines), key
    assert not any("not a key the migrator knows" in line for line in res.lines)
    assert all(" -> " in line for line in res.lines)
    if name.startswith("pp_"):
        assert ours.train.betas == (0.9, 0.99) and ours.train.eps == 1e-7 and ours.model.vision.frozen
        assert ours.train.activation_checkpoint_interval == 1 and ours.train.precision == "bf16"
    if name == "pp_qwen14b_sft_100k_pp.yaml":
        assert ours.train.zero_stage == 1 and ours.train.offload_optimizer and ours.train.num_stages == 6
        assert ours.model.llm.path == "cache/ckpt/Qwen-14B-Chat" and ours.data.max_txt_len == 512
    if name == "minigpt4_stage1_pretrain.yaml":
        t = ours.train
        assert (t.max_steps, t.warmup_steps, t.lr, t.min_lr, t.grad_clip) == (20000, 5000, 1e-4, 8e-5, 0.0)
        assert t.micro_batch_size * t.grad_accum_steps * 2 == 256 and t.num_stages == 2  # 4 GPUs: PP2 x DP2
        assert ours.model.llm.template == "vicuna_v0" and ours.data.train[0].format == "llava_pretrain"
    if name == "minigpt4_eval.yaml":
        assert ours.data.train == [] and ours.model.checkpoint is None


def test_mpp_7b_sft_side_by_side_matches_the_original(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write(tmp_path, "sft.yaml", mpp_config("qwen7b_chat", "sft_video"))
    out = tmp_path / "sft_ours.yaml"
    assert main([str(src), "-o", str(out), "--num-samples", "157712", "98900"]) == 0
    text = capsys.readouterr().out
    rows = {ln.split("  ")[0]: ln for ln in text.splitlines()}
    res = migrate(src, out, Args(num_samples=[157712, 98900]))
    table = {q: (a, b) for q, a, b in res.table}
    assert set(table) >= {"global batch", "warmup steps", "total steps", "min lr", "max length", "precision"}
    assert all(a == b for a, b in table.values()), table
    # MPP's released SFT checkpoint is global_step2005: one epoch of the two datasets at global batch 128
    assert table["global batch"][0] == "128 = 1 x 128 x DP1" and table["total steps"] == ("2005", "2005")
    assert table["warmup steps"] == ("200", "200") and table["max length"] == ("1536", "1536")
    assert table["precision"] == ("bf16", "bf16") and table["min lr"] == ("0", "0")
    assert "<- differs" not in text and "wrote" in text and "global batch" in rows
    cfg = load_config(out)
    assert (cfg.train.num_stages, cfg.data.num_video_frames, cfg.data.video_same_augment) == (8, 32, False)
    for step in (200, 1000, 1500, 2004):  # after the warmup the LR is the same function of the step in both
        assert mpp_lr(step, warmup=200, total=2005, lr=2e-5, min_lr=0.0, warmup_lr=0.0) == pytest.approx(
            _ours_lr(cfg, step), rel=1e-9, abs=1e-15)


def _ours_lr(cfg: Any, step: int) -> float:
    from lavis.engine.optim import warmup_cosine

    t = cfg.train
    return warmup_cosine(step, warmup=t.warmup_steps, total=t.max_steps, lr=t.lr, min_lr=t.min_lr)


def test_sample_counts_come_from_the_annotation_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ann = tmp_path / "cache/dataset/llava_pretrain/blip_laion_cc_sbu_558k/llava_pretrain_minigpt4qwen_format.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps([{"image": f"{i}.jpg", "instruction": "<Img><ImageHere></Img> Describe.",
                                "output": "A cat."} for i in range(1000)]))
    src = write(tmp_path, "pretrain.yaml", mpp_config("qwen7b_chat", "pretrain"))
    monkeypatch.chdir(tmp_path)
    res = migrate(src, tmp_path / "o.yaml")
    # ceil(1000 / DP 4) = 250 per replica -> 31 micro-batches of 8 -> ceil(31 / GAS 8) = 4 steps; warmup int(0.03 x 4)
    assert (res.cfg.train.max_steps, res.cfg.train.warmup_steps) == (4, 0)
    assert any("1000 samples (counted in the annotation files" in ln for ln in res.lines)
    monkeypatch.chdir(tmp_path / "cache")
    with pytest.raises(ConfigError, match="--num-samples"):
        migrate(src, tmp_path / "o.yaml")


def test_every_tool_refuses_a_predecessor_yaml_with_the_command(tmp_path: Path) -> None:
    src = write(tmp_path, "sft.yaml", mpp_config("qwen7b_chat", "sft_video"))
    with pytest.raises(ConfigError, match=r"MPP-Qwen-Next.*`model.arch`, `datasets`, `run`.*python -m "
                                          r"lavis.config.migrate .*sft.yaml -o sft_migrated.yaml"):
        load_config(src)
    mg = write(tmp_path, "minigpt4_eval.yaml", minigpt4_config("eval"))
    from lavis.inspect import main as inspect_main

    with pytest.raises(ConfigError, match="is a MiniGPT-4 config .*python -m lavis.config.migrate"):
        inspect_main(["--cfg-path", str(mg)])
    base = write(tmp_path, "ours.yaml", {"base": "sft.yaml", "train": {"max_steps": 3}})
    with pytest.raises(ConfigError, match="sft.yaml is a MPP-Qwen-Next"):  # also through `base:`
        load_config(base)


@pytest.mark.process
def test_a_migrated_config_trains(tmp_path: Path, tiny_data: Path) -> None:
    """MPP's 7B pretrain config, migrated, trains on the tiny demo model and data (2 stages, 2 steps)."""
    src = write(tmp_path, "pretrain.yaml", mpp_config("qwen7b_chat", "pretrain"))
    out = tmp_path / "pretrain_ours.yaml"
    assert main([str(src), "-o", str(out), "--num-samples", "558128"]) == 0
    demo = to_dict(load_config(DEMO_CFG))["model"]
    tiny = [f"model.{k}={yaml_literal(v)}" for k, v in flatten(demo).items()
            if not k.endswith("frozen") and k not in ("llm.path", "checkpoint")]
    tiny += ["model.checkpoint=null", "model.llm.path=null"]
    run = tmp_path / "run"
    launch(2, ["--cfg-path", str(out), "--num-stages", "2", "--max-steps", "2", "--output-dir", str(run),
               "--options", *tiny, *COMMON, "train.grad_accum_steps=2", "data.max_txt_len=128",
               "data.num_workers=0", "data.pad_to_multiple_of=16", "data.num_video_frames=4", *data_options(tiny_data),
               "data.train.0.format=canonical"])
    assert len(losses(run)) == 2
    saved = load_config(run / "config.yaml")
    assert saved.model.llm.frozen and not saved.model.projection.frozen and saved.train.betas == (0.9, 0.99)


@pytest.mark.parametrize("source,recipe", [
    ("pp_qwen7b_video_pretrain.yaml", "qwen7b/pretrain_8x3090.yaml"),
    ("pp_qwen7b_video_sft.yaml", "qwen7b/sft_video_8x3090.yaml"),
    ("pp_qwen14b_pretrain_pp.yaml", "qwen14b/pretrain_2x4090.yaml"),
    ("pp_qwen14b_sft_100k_pp.yaml", "qwen14b/sft_6x4090.yaml"),
    ("minigpt4_stage1_pretrain.yaml", "minigpt4/vicuna7b_stage1.yaml"),
    ("minigpt4_stage2_finetune.yaml", "minigpt4/vicuna7b_stage2.yaml"),
])
def test_shipped_recipes_match_the_predecessor_files(source: str, recipe: str, tmp_path: Path) -> None:
    """The recipes' schedule, batch, length, optimizer and precision equal what migrate derives from the
    predecessor's file (the recipe comments name the commit and every deliberate difference)."""
    cfg, counts = CASES[source]
    res = migrate(write(tmp_path, source, cfg), tmp_path / "o.yaml", Args(num_samples=counts))
    ours = load_config(REPO / "lavis/projects" / recipe)
    fields = ["max_steps", "warmup_steps", "lr", "min_lr", "betas", "eps", "weight_decay", "grad_clip", "precision",
              "zero_stage", "offload_optimizer", "num_stages"]
    t, m = ours.train, res.cfg.train
    assert {f: getattr(t, f) for f in fields} == {f: getattr(m, f) for f in fields}
    assert t.micro_batch_size * t.grad_accum_steps == m.micro_batch_size * m.grad_accum_steps  # same global batch
    for f in ("max_txt_len", "num_video_frames", "video_same_augment", "transform"):
        assert getattr(ours.data, f) == getattr(res.cfg.data, f), f
    assert [(d.ann_path, d.format) for d in ours.data.train] == [(d.ann_path, d.format) for d in res.cfg.data.train]
    assert (ours.model.llm.path, ours.model.llm.frozen) == (res.cfg.model.llm.path, res.cfg.model.llm.frozen)
