"""``python -m lavis.config.migrate`` on predecessor YAMLs rebuilt here with the key structure those projects ship
(MPP-Qwen-Next ``lavis/projects/pp_qwen7b_video/*.yaml`` / ``pp_qwen14b/*.yaml``, MiniGPT-4 ``train_configs`` /
``eval_configs``): every key gets a line, the result loads strictly, the 7B SFT schedule matches the original's,
one migrated config trains, and every tool refuses a predecessor YAML with the migrate command."""

from __future__ import annotations

import json
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import yaml

from lavis.config.load import ConfigError, load_config, to_dict
from lavis.predecessors.migrate import Args, flatten, main, migrate, mpp_lr, yaml_literal

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
    """As the predecessors write their files: every value spelled out (no YAML anchors for shared sub-dicts)."""
    p = tmp / name
    p.write_text(yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False))
    return p


def minigpt4_v1_config(kind: str, llm: str) -> dict[str, Any]:
    """MiniGPT-4 d94738a's train_configs/minigpt4[_llama2]_stage{1,2}*.yaml and eval_configs/minigpt4[_llama2]_eval.yaml
    as shipped (stage 2 and eval say ``arch: mini_gpt4``; stage 2 has ``run.batch_size_train``)."""
    cfg = minigpt4_config(kind)
    mt = {"vicuna": "pretrain_vicuna0", "llama2": "pretrain_llama2"}[llm]
    cfg["model"]["model_type"] = mt
    if kind != "stage1":
        cfg["model"]["arch"] = "mini_gpt4"
    if llm == "llama2":
        if kind != "stage1":
            cfg["model"].update(end_sym="</s>", prompt_template="[INST] {} [/INST] ")
        if kind == "eval":
            cfg["model"]["ckpt"] = "/home/zhud/weights/minigpt4/pretrained_minigpt4_llama2_7b.pth"
            cfg["model"]["llama_model"] = "/ibex/project/c2133/llama_v2/llama-2-7b-chat-pytorch_update"
    if kind == "stage2":
        cfg["model"]["ckpt"] = "/absolute/path/to/stage1/checkpoint/"
        del cfg["datasets"]["cc_sbu_align"]["batch_size"]
        cfg["run"].update(batch_size_train=12, batch_size_eval=12, warmup_lr="1e-6")
        for k in ("wandb_log", "job_name"):
            cfg["run"].pop(k)
    if kind == "stage1":
        cfg["run"].update(warmup_lr="1e-6")
        for k in ("wandb_log", "job_name"):
            cfg["run"].pop(k)
    return cfg


def mpp_nonpipeline_config(kind: str) -> dict[str, Any]:
    """MPP's instruction_tuning/train.yaml (LAVIS runner, amp) and deepspeed/train_zero0_3090x4.yaml (ZeRO DP)."""
    model = {k: v for k, v in mpp_config("qwen7b_chat", "pretrain")["model"].items() if k != "enable_autocast"}
    model["max_txt_len"] = 256
    proc = {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": 224}},
            "text_processor": {"train": {"name": "base_instruction", "max_words": 100}}}
    run = {"task": "image_text_pretrain", "lr_sched": "linear_warmup_cosine_lr", "init_lr": "1e-4", "min_lr": "1e-6",
           "warmup_lr": 0, "warmup_steps": 500, "max_epoch": 5, "batch_size_eval": 1, "num_workers": 4, "seed": 42,
           "evaluate": False, "train_splits": ["train"], "world_size": 1, "dist_url": "env://", "distributed": True}
    if kind == "train_3090x4":  # its amp and dtype sit under run:, with loss_scale; no max_new_tokens, fsdp
        run.update(weight_decay=0.05, grad_norm_clip=1.0, batch_size_train=1, accum_grad_iters=32, max_epoch=10,
                   output_dir="output/instruction_tuning/lr1e-4_4x3090", amp=True, autocast_dtype="bf16",
                   loss_scale=False, resume_ckpt_path=None, device="cuda")
    elif kind == "train":
        model["autocast_dtype"] = "bfloat16"
        run.update(weight_decay=0.05, grad_norm_clip=1.0, batch_size_train=4, accum_grad_iters=4, max_new_tokens=100,
                   min_new_tokens=1, num_beams=5, output_dir="output/instruction_tuning", amp=True,
                   resume_ckpt_path=None, device="cuda", fsdp=False)
    else:
        model["enable_autocast"] = False
        run.update(runner="deepspeed_runner", task="deepspeed_image_text_pretrain", max_epoch=10, batch_size_train=2,
                   output_dir="output/deepspeed/lr1e-4_4x3090_zero0", log_freq=32, resume_ckpt_load_dir=None,
                   resume_ckpt_tag=None,
                   deepspeed_config=mpp_config("qwen7b_chat", "pretrain")["run"]["deepspeed_config"])
        run["deepspeed_config"].update(gradient_accumulation_steps=16, train_micro_batch_size_per_gpu=2)
        run["deepspeed_config"]["optimizer"]["params"].update(lr="1e-4", weight_decay=0.05)
    return {"model": model, "datasets": {"minigpt4_instruction": proc, "llava_instruction": proc}, "run": run}


def mpp_14b_train_pp() -> dict[str, Any]:
    """MPP's pp_qwen14b/train_pp.yaml: no lr_sched, init_lr, min_lr or warmup keys; output_dir lavis/output/pp_14b/."""
    cfg = mpp_config("qwen14b_chat", "pretrain")
    cfg["datasets"] = mpp_nonpipeline_config("train")["datasets"]
    for k in ("lr_sched", "warmup_lr", "init_lr", "min_lr", "warmup_ratio"):
        cfg["run"].pop(k)
    cfg["run"].update(output_dir="lavis/output/pp_14b/", max_epoch=5, log_freq=50)
    cfg["run"]["deepspeed_config"]["optimizer"]["params"].update(lr="1e-4", weight_decay=0.05)
    cfg["model"]["max_txt_len"] = 256
    return cfg


CASES = {  # file -> (config, --num-samples)
    "pp_qwen7b_video_pretrain.yaml": (mpp_config("qwen7b_chat", "pretrain"), [558128]),
    "pp_qwen7b_video_sft.yaml": (mpp_config("qwen7b_chat", "sft_video"), [157712, 98900]),
    "pp_qwen14b_pretrain_pp.yaml": (mpp_config("qwen14b_chat", "pretrain"), [558128]),
    "pp_qwen14b_sft_100k_pp.yaml": (mpp_config("qwen14b_chat", "sft"), [100000]),
    "minigpt4_stage1_pretrain.yaml": (minigpt4_config("stage1"), None),
    "minigpt4_stage2_finetune.yaml": (minigpt4_config("stage2"), None),
    "minigpt4_eval.yaml": (minigpt4_config("eval"), None),
    "d94738a_minigpt4_stage1_pretrain.yaml": (minigpt4_v1_config("stage1", "vicuna"), None),
    "d94738a_minigpt4_stage2_finetune.yaml": (minigpt4_v1_config("stage2", "vicuna"), None),
    "d94738a_minigpt4_eval.yaml": (minigpt4_v1_config("eval", "vicuna"), None),
    "minigpt4_llama2_stage1_pretrain.yaml": (minigpt4_v1_config("stage1", "llama2"), None),
    "minigpt4_llama2_stage2_finetune.yaml": (minigpt4_v1_config("stage2", "llama2"), None),
    "minigpt4_llama2_eval.yaml": (minigpt4_v1_config("eval", "llama2"), None),
    "instruction_tuning_train.yaml": (mpp_nonpipeline_config("train"), [30000, 150000]),
    "instruction_tuning_train_3090x4.yaml": (mpp_nonpipeline_config("train_3090x4"), [30000, 150000]),
    "train_zero0_3090x4.yaml": (mpp_nonpipeline_config("zero"), [30000, 150000]),
    "pp_qwen14b_train_pp.yaml": (mpp_14b_train_pp(), [30000, 150000]),
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
    assert all(" -> " in line for line in res.lines)
    if name.startswith("pp_"):
        assert ours.train.optim.betas == (0.9, 0.99) and ours.train.optim.eps == 1e-7 and ours.model.vision.frozen
        assert ours.train.parallel.activation_checkpoint_interval == 1 and ours.train.precision == "bf16"
    if name == "pp_qwen14b_sft_100k_pp.yaml":
        assert ours.train.optim.zero_stage == 1 and ours.train.optim.offload_optimizer
        assert ours.train.parallel.num_stages == 6
        assert ours.model.llm.path == "cache/ckpt/Qwen-14B-Chat" and ours.data.max_txt_len == 512
    if name == "minigpt4_stage1_pretrain.yaml":
        t = ours.train
        o = t.optim
        assert (t.max_steps, o.warmup_steps, o.lr, o.min_lr, o.grad_clip) == (20000, 5000, 1e-4, 8e-5, 0.0)
        assert t.batch.micro_batch_size * t.batch.grad_accum_steps * 2 == 256  # 4 GPUs: PP2 x DP2
        assert t.parallel.num_stages == 2
        assert ours.model.llm.template == "vicuna_v0"
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
    assert (cfg.train.parallel.num_stages, cfg.data.num_video_frames, cfg.data.video_same_augment) == (8, 32, False)
    for step in (200, 1000, 1500, 2004):  # after the warmup the LR is the same function of the step in both
        assert mpp_lr(step, warmup=200, total=2005, lr=2e-5, min_lr=0.0, warmup_lr=0.0) == pytest.approx(
            _ours_lr(cfg, step), rel=1e-9, abs=1e-15)


def _ours_lr(cfg: Any, step: int) -> float:
    from lavis.engine.optim import warmup_cosine

    t = cfg.train
    return warmup_cosine(step, warmup=t.optim.warmup_steps, total=t.max_steps, lr=t.optim.lr, min_lr=t.optim.min_lr)


def test_sample_counts_come_from_the_annotation_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ann = tmp_path / "cache/dataset/llava_pretrain/blip_laion_cc_sbu_558k/llava_pretrain_minigpt4qwen_format.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps([{"image": f"{i}.jpg", "instruction": "<Img><ImageHere></Img> Describe.",
                                "output": "A cat."} for i in range(1000)]))
    src = write(tmp_path, "pretrain.yaml", mpp_config("qwen7b_chat", "pretrain"))
    monkeypatch.chdir(tmp_path)
    res = migrate(src, tmp_path / "o.yaml")
    # ceil(1000 / DP 4) = 250 per replica -> 31 micro-batches of 8 -> ceil(31 / GAS 8) = 4 steps; warmup int(0.03 x 4)
    assert (res.cfg.train.max_steps, res.cfg.train.optim.warmup_steps) == (4, 0)
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
               "--options", *tiny, *COMMON, "train.batch.grad_accum_steps=2", "data.max_txt_len=128",
               "data.num_workers=0", "data.pad_to_multiple_of=16", "data.num_video_frames=4", *data_options(tiny_data),
               "data.train.0.format=canonical"])
    assert len(losses(run)) == 2
    saved = load_config(run / "config.yaml")
    assert saved.model.llm.frozen and not saved.model.projection.frozen and saved.train.optim.betas == (0.9, 0.99)


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
    optim = ("warmup_steps", "lr", "min_lr", "betas", "eps", "weight_decay", "grad_clip", "zero_stage",
             "offload_optimizer")
    fields = ["max_steps", "precision", "parallel.num_stages", *(f"optim.{f}" for f in optim)]
    t, m = ours.train, res.cfg.train
    assert {f: attrgetter(f)(t) for f in fields} == {f: attrgetter(f)(m) for f in fields}
    same_global_batch = t.batch.micro_batch_size * t.batch.grad_accum_steps
    assert same_global_batch == m.batch.micro_batch_size * m.batch.grad_accum_steps
    for f in ("max_txt_len", "num_video_frames", "video_same_augment", "transform"):
        assert getattr(ours.data, f) == getattr(res.cfg.data, f), f
    if source != "minigpt4_stage1_pretrain.yaml":  # the recipe trains on LLaVA-558k: LAION's shards are withdrawn
        assert [(d.ann_path, d.format) for d in ours.data.train] == [(d.ann_path, d.format)
                                                                     for d in res.cfg.data.train]
    assert (ours.model.llm.path, ours.model.llm.frozen) == (res.cfg.model.llm.path, res.cfg.model.llm.frozen)


# --- every key mapped or refused; input errors are one line and status 1 ------------------------------------------


def test_migrate_refuses_to_overwrite_its_input(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path, "sft.yaml", mpp_config("qwen7b_chat", "sft_video"))
    before = src.read_text()
    monkeypatch.chdir(tmp_path)
    for out in (str(src), "sft.yaml", "./sft.yaml"):
        assert main([str(src), "-o", out, "--num-samples", "157712", "98900"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: -o {out} is the input file") and "_migrated" in err[0]
    assert src.read_text() == before


@pytest.mark.parametrize("text,where", [("model: {arch: minigpt4qwen\n", ":2: invalid YAML"),
                                        ("a: &a [1]\nb: *a\n", ":2: invalid YAML: alias *a"),
                                        ("run: !!python/object/apply:os.system [x]\n", ":1: invalid YAML")])
def test_migrate_on_bad_yaml_is_one_line_and_status_1(text: str, where: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "bad.yaml"
    src.write_text(text)
    assert main([str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src}{where}"), err
    assert main([str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a malformed command line stays argparse's usage error
        main([str(src), "--num-stages", "two"])
    assert e.value.code == 2


def test_fewer_samples_than_one_batch_names_the_cause_and_the_file(tmp_path: Path) -> None:
    src = write(tmp_path, "pretrain.yaml", mpp_config("qwen7b_chat", "pretrain"))
    with pytest.raises(ConfigError) as e:  # ceil(20 / DP 4) = 5 samples per replica: not one micro-batch of 8
        migrate(src, tmp_path / "o.yaml", Args(num_samples=[20]))
    msg = str(e.value)
    assert msg.startswith(f"{src}: 20 samples make no optimizer step at the global batch 256 (micro 8 x GAS 8 x "
                          "DP 4)") and "tmp" not in msg.replace(str(tmp_path), "")
    assert "--num-samples" in msg


def test_minigpt4_data_maps_to_the_readers_of_its_files(tmp_path: Path) -> None:
    res = migrate(write(tmp_path, "s1.yaml", minigpt4_v1_config("stage1", "llama2")), tmp_path / "o.yaml")
    assert [(d.ann_path, d.format) for d in res.cfg.data.train] == [
        ("cache/dataset/laion_dataset/{00000..10488}.tar", "webdataset"),
        ("cache/dataset/cc_sbu_dataset/{00000..01255}.tar", "webdataset")]
    assert res.cfg.model.llm.template == "minigpt4_llama2"
    cfg = minigpt4_v1_config("stage1", "vicuna")
    cfg["datasets"]["laion"]["build_info"] = {"storage": "/data/laion/{00000..00003}.tar"}
    res = migrate(write(tmp_path, "s1b.yaml", cfg), tmp_path / "o.yaml")
    assert res.cfg.data.train[0].ann_path == "/data/laion/{00000..00003}.tar"
    cfg = minigpt4_v1_config("stage2", "vicuna")
    res = migrate(write(tmp_path, "s2.yaml", cfg), tmp_path / "o.yaml")
    d = res.cfg.data.train[0]
    assert (d.ann_path, d.vis_root, d.format) == ("cache/dataset/cc_sbu_align/filter_cap.json",
                                                  "cache/dataset/cc_sbu_align/image", "minigpt4_captions")
    b = res.cfg.train.batch
    assert b.micro_batch_size * b.grad_accum_steps == 12  # run.batch_size_train x 1 GPU
    cfg["datasets"]["cc_sbu_align"]["build_info"] = {"storage": "/data/cc_sbu_align/"}
    d = migrate(write(tmp_path, "s2b.yaml", cfg), tmp_path / "o.yaml").cfg.data.train[0]
    assert (d.ann_path, d.vis_root) == ("/data/cc_sbu_align/filter_cap.json", "/data/cc_sbu_align/image")


def test_minigpt4_filter_cap_json_trains_through_the_migrated_entry(tmp_path: Path) -> None:
    """The migrated cc_sbu_align entry reads MiniGPT-4's own filter_cap.json layout."""
    from lavis.data.formats import FORMATS, to_canonical

    root = tmp_path / "cache/dataset/cc_sbu_align"
    (root / "image").mkdir(parents=True)
    (root / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "2", "caption": "A cat."}]}))
    res = migrate(write(tmp_path, "s2.yaml", minigpt4_v1_config("stage2", "vicuna")), tmp_path / "o.yaml")
    ds = res.cfg.data.train[0]
    ds.ann_path, ds.vis_root = str(tmp_path / ds.ann_path), str(tmp_path / ds.vis_root)
    ((where, raw),) = FORMATS[ds.format].read(ds.ann_path)
    rec = to_canonical(raw, where, 0, ds)
    assert rec["images"] == ["2.jpg"] and rec["conversations"][1]["content"] == "A cat."


def test_mpp_lora_keys_map_to_model_llm_lora(tmp_path: Path) -> None:
    cfg = mpp_config("qwen7b_chat", "sft_video")
    cfg["model"].update(get_lora=True, lora_r=16, lora_alpha=64, lora_dropout=0.1)
    res = migrate(write(tmp_path, "lora.yaml", cfg), tmp_path / "o.yaml", Args(num_samples=[157712, 98900]))
    lora = res.cfg.model.llm.lora
    assert lora is not None and (lora.r, lora.alpha, lora.dropout, lora.targets) == (16, 64.0, 0.1,
                                                                                     ["q_proj", "v_proj"])
    assert res.cfg.model.llm.frozen
    assert not any("not implemented" in ln for ln in res.lines)
    off = migrate(write(tmp_path, "nolora.yaml", mpp_config("qwen7b_chat", "sft_video")), tmp_path / "o.yaml",
                  Args(num_samples=[157712, 98900]))
    assert off.cfg.model.llm.lora is None
    assert any(ln.startswith("model.lora_r: 8 -> no equivalent: get_lora is false") for ln in off.lines)


def test_mpp_non_pipeline_configs_keep_batch_precision_decay_and_clipping(tmp_path: Path) -> None:
    res = migrate(write(tmp_path, "train.yaml", mpp_nonpipeline_config("train")), tmp_path / "o.yaml",
                  Args(num_samples=[30000, 150000]))
    t = res.cfg.train
    o = t.optim
    assert (t.precision, o.weight_decay, o.grad_clip, o.lr, o.min_lr) == ("bf16", 0.05, 1.0, 1e-4, 1e-6)
    assert t.batch.micro_batch_size == 4 and t.batch.micro_batch_size * t.batch.grad_accum_steps * res.dp == 16
    # LAVIS: floor(floor(180000 / 4) / 4) = 11250 optimizer steps per epoch, 5 epochs; warmup 500 iterations / 4
    assert (t.max_steps, t.optim.warmup_steps) == (56250, 125)
    table = {q: (a, b) for q, a, b in res.table}
    assert table["global batch"][0] == "16 = 4 x 4 x DP1 (assumed)" and table["precision"] == ("bf16", "bf16")
    assert any("GPUs are not in the file: assumed 1" in ln for ln in res.assumed)

    zero = migrate(write(tmp_path, "train_zero0_3090x4.yaml", mpp_nonpipeline_config("zero")), tmp_path / "o.yaml",
                   Args(num_samples=[30000, 150000]))
    table = {q: (a, b) for q, a, b in zero.table}
    assert table["global batch"][0] == "128 = 2 x 16 x DP4 (assumed)"
    assert table["global batch"][1].startswith("128 = ")
    from lavis.predecessors.migrate import format_rows

    assert "<- differs" not in format_rows([r for r in zero.table if r[0] == "global batch"])  # same global batch
    assert any("assumed 4 from its name" in ln for ln in zero.assumed)
    assert zero.cfg.train.precision == "bf16" and zero.cfg.train.optim.weight_decay == 0.05
    x4 = migrate(write(tmp_path, "train_3090x4.yaml", mpp_nonpipeline_config("train_3090x4")), tmp_path / "o.yaml",
                 Args(num_samples=[30000, 150000]))
    assert x4.cfg.train.precision == "bf16" and dict((q, a) for q, a, _ in x4.table)["global batch"] == \
        "128 = 1 x 32 x DP4 (assumed)"
    given = migrate(write(tmp_path, "train_zero0_3090x4.yaml", mpp_nonpipeline_config("zero")), tmp_path / "o.yaml",
                    Args(num_samples=[30000, 150000], pred_gpus=8))
    assert dict((q, a) for q, a, _ in given.table)["global batch"] == "256 = 2 x 16 x DP8" and not given.assumed


def test_a_schedule_the_file_does_not_state_is_labelled_assumed(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    src = write(tmp_path, "train_pp.yaml", mpp_14b_train_pp())
    assert main([str(src), "-o", str(tmp_path / "o.yaml"), "--num-samples", "30000", "150000"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith(("lr at step", "min lr", "warmup steps"))]
    assert rows and all("(assumed)" in ln for ln in rows), rows
    assert "(assumed) lr at step: no run.lr_sched in the file" in out
    assert not any("(assumed)" in ln for ln in out.splitlines() if ln.startswith(("peak lr", "precision")))


def test_minigpt_v2_custom_prompts_and_unknown_keys_are_refused_by_name(tmp_path: Path) -> None:
    v2 = {"model": {"arch": "minigpt_v2", "model_type": "pretrain", "lora_r": 64}, "run": {"task": "image_text"}}
    with pytest.raises(ConfigError, match=r"v2.yaml: model.arch: minigpt_v2: MiniGPT-v2 is not supported"):
        migrate(write(tmp_path, "v2.yaml", v2), tmp_path / "o.yaml")
    cfg = minigpt4_v1_config("stage2", "vicuna")
    cfg["model"]["prompt_path"] = "prompts/my_questions.txt"
    with pytest.raises(ConfigError, match=r"model.prompt_path: prompts/my_questions.txt: custom prompt files"):
        migrate(write(tmp_path, "p.yaml", cfg), tmp_path / "o.yaml")
    cfg = minigpt4_v1_config("stage2", "vicuna")
    cfg["run"]["my_knob"] = 3
    with pytest.raises(ConfigError, match=r"u.yaml: `run.my_knob` is not a key of any MiniGPT-4 file"):
        migrate(write(tmp_path, "u.yaml", cfg), tmp_path / "o.yaml")
    cfg = mpp_nonpipeline_config("train")
    cfg["run"]["fsdp"] = True
    with pytest.raises(ConfigError, match=r"run.fsdp: true"):
        migrate(write(tmp_path, "f.yaml", cfg), tmp_path / "o.yaml", Args(num_samples=[30000, 150000]))


def test_minigpt4_resume_ckpt_path_is_weights_only_and_says_so(tmp_path: Path) -> None:
    cfg = minigpt4_v1_config("stage2", "vicuna")
    cfg["run"]["resume_ckpt_path"] = "output/minigpt4_stage2_finetune/20230501/checkpoint_3.pth"
    res = migrate(write(tmp_path, "r.yaml", cfg), tmp_path / "o.yaml")
    assert res.cfg.model.checkpoint == "output/minigpt4_stage2_finetune/20230501/checkpoint_3.pth"
    line = next(ln for ln in res.lines if ln.startswith("run.resume_ckpt_path"))
    assert "WEIGHTS ONLY" in line and "optimizer, scaler and epoch" in line


def test_migrating_md_key_table_is_generated_from_the_table() -> None:
    from lavis.predecessors.keys import MINIGPT4_KEYS, MPP_KEYS
    from lavis.predecessors.migrate import DOC, docs_with_table

    text = DOC.read_text(encoding="utf-8")
    assert docs_with_table(text) == text, "run: python -m lavis.config.migrate --table-md"
    for key in [*MPP_KEYS, *MINIGPT4_KEYS, "--llm-grad-ckpt"]:
        assert f"| `{key}` |" in text, key


def test_every_key_of_every_case_is_in_the_table() -> None:
    from lavis.predecessors.keys import MINIGPT4, MPP, rule_for

    for name, (cfg, _) in CASES.items():
        family = MPP if cfg["model"]["arch"] == "minigpt4qwen" else MINIGPT4
        for key in flatten(cfg):
            assert rule_for(family, key) is not None, (name, key)


@pytest.mark.process
def test_migrate_command_exit_status_and_one_line(tmp_path: Path) -> None:
    """As a user runs it: an input error is one `error:` line and status 1; the training command names a
    predecessor's flag's equivalent."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: [minigpt4\n")
    r = subprocess.run([sys.executable, "-m", "lavis.config.migrate", str(bad), "-o", str(tmp_path / "o.yaml")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"error: {bad}:3: invalid YAML")
    src = write(tmp_path, "pretrain.yaml", mpp_config("qwen7b_chat", "pretrain"))
    r = subprocess.run([sys.executable, "-m", "lavis.config.migrate", str(src), "-o", str(src), "--num-samples",
                        "558128"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "is the input file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "train_pipeline.py", "--cfg-path", str(DEMO_CFG), "--llm-grad-ckpt"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--options train.parallel.activation_checkpoint_interval=0" in r.stderr, r.stderr
