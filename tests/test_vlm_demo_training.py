"""The tiny Qwen2.5-VL demo recipe trains end to end through ``train_pipeline.py`` under torchrun (gloo, CPU): the
data side (``build_vlm_data``, the builtin processor, dynamic-shape micro-batches of images, pairs, multi-turn
samples and video clips) feeds the model side's pipeline layers; 1, 2 and 3 stages give the same losses, the first
equal to transformers' own model's on the same micro-batches; the run saves
its processor and ``pipemodel2pth.py --hf-out`` of the 2-stage run loads in transformers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lavis.config.load import load_config
from lavis.data.datasets import StepSampler, load_records
from lavis.data.records import ConcatRecords
from lavis.demo.run import evaluate_model_dir, export_hf
from lavis.engine.vlm_checkpoint import trained_model
from lavis.families import describe, family_named
from lavis.model.mllm import lm_loss
from lavis.testing.vlm import reference_forward
from lavis.vlm.data import RUN_PROCESSOR_DIR

from .conftest import REPO, data_options, launch, losses

RECIPE = REPO / "lavis/projects/demo/shapes_qwen2_5_vl.yaml"
STEPS = 5
OPTIONS = ["train.batch.micro_batch_size=4", "train.batch.grad_accum_steps=2", "train.optim.warmup_steps=0",
           "train.optim.lr=1e-3", "train.precision=fp32", "train.checkpoint.save_every=0", "train.num_threads=1"]


def train_demo(tmp: Path, stages: int, data: Path) -> Path:
    out = tmp / f"pp{stages}"
    proc = launch(stages, ["--cfg-path", str(RECIPE), "--num-stages", str(stages), "--max-steps", str(STEPS),
                           "--output-dir", str(out), "--options", *OPTIONS, *data_options(data)])
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    return out


def transformers_first_loss(data: Path) -> float:
    """The loss of step 1 computed by transformers' own model of the recipe, with the weights the run starts from
    (``model.vlm.init_seed``), on the micro-batches the trainer's sampler and collator make for step 1: the mean of
    the micro-batches' losses, as DeepSpeed reports it."""
    cfg = load_config(RECIPE, [*OPTIONS, *data_options(data)])
    spec = describe(cfg.model)
    family = family_named(spec.family)
    records = [load_records(d) for d in cfg.data.train]
    dataset, collate = family.training_data(family.run_text(spec, cfg), ConcatRecords(records), cfg, load_media=True)
    t = cfg.train
    sampler = StepSampler([len(r) for r in records], [d.weight for d in cfg.data.train], seed=t.seed,
                          micro_batch_size=t.batch.micro_batch_size, grad_accum_steps=t.batch.grad_accum_steps,
                          dp_rank=0, dp_size=1, length_of=dataset.num_tokens if cfg.data.group_by_length else None)
    assert cfg.model.vlm is not None
    model = trained_model(cfg.model.vlm, {}, "the recipe's init").eval()
    out = []
    with torch.no_grad():
        for micro in sampler.step_keys(0):
            inputs, labels = collate([dataset[k] for k in micro[0]])
            out.append(float(lm_loss(reference_forward(model, tuple(inputs)).logits, labels)))
    return sum(out) / len(out)


@pytest.mark.process
def test_demo_recipe_trains_with_1_2_and_3_stages_to_the_same_losses(tiny_data: Path, tmp_path: Path) -> None:
    one, two, three = (train_demo(tmp_path, n, tiny_data) for n in (1, 2, 3))
    a = losses(one)
    assert len(a) == STEPS and all(math.isfinite(x) for x in a), a
    for run in (two, three):
        b = losses(run)
        assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True)), (run.name, a, b)
    assert a[-1] < a[0], a  # lr 1e-3 without warmup: five steps on the shapes data lower the loss
    first = transformers_first_loss(tiny_data)
    assert abs(a[0] - first) <= 1e-5 * first, (a[0], first)
    log = (tmp_path / "pp2.log").read_text()
    assert "boundaries [0, " in log and "rank 1 (stage 1)" in log  # really two stages
    log = (tmp_path / "pp3.log").read_text()
    assert "rank 2 (stage 2)" in log and "rank 3" not in log  # really three stages
    saved = AutoProcessor.from_pretrained(str(two / RUN_PROCESSOR_DIR))
    assert type(saved).__name__ == "Qwen2_5_VLProcessor"

    hf_out = tmp_path / "hf"
    subprocess.run([sys.executable, str(REPO / "pipemodel2pth.py"), "--ckpt-dir", str(two), "--hf-out", str(hf_out)],
                   cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    model = AutoModelForImageTextToText.from_pretrained(str(hf_out))
    processor = AutoProcessor.from_pretrained(str(hf_out))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text = "What colour is the shape?"
    assert processor.tokenizer.encode(text) == saved.tokenizer.encode(text)

    # `python -m lavis.demo --vlm`'s steps 3-4 on this run: the fp32 export, scored on the demo's benchmark files.
    exported = export_hf(two)
    assert exported == two / "hf"
    res = evaluate_model_dir(exported, 3, 5, tmp_path / "eval", bench_dir=tmp_path / "bench")
    assert (res["vqa"]["scores"]["count"], res["yesno"]["scores"]["count"]) == (3, 6)
    rows = (tmp_path / "eval/yesno/predictions.jsonl").read_text().splitlines()
    assert len(rows) == 6 and res["yesno"]["config"] == str(exported)
