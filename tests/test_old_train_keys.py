"""The flat ``train`` keys of earlier versions keep working: a recipe (each file of a ``base:`` chain), an
``--options`` item and a saved run directory that name a key by its old name are read as its new key, the first two
with one warning line naming the new key; removed keys (validated, never read) are a warning that they have no effect;
an old run directory resumes. The old names are mostly built from the schema here; the markers below keep the key
rename script (which moves ``train.<key>`` to ``train.<section>.<key>``) away from the few written out."""
# old-train-keys: begin

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lavis.config.load import ConfigError, from_dict, load_config, to_dict
from lavis.config.old_keys import REMOVED_TRAIN_KEYS, _warned
from lavis.config.schema import TRAIN_SECTIONS, Config
from lavis.engine.checkpoint import write_checksums
from lavis.engine.run_dir import RunDirError, check_resume_config

from .conftest import COMMON, DEMO_CFG, data_options, launch, losses

# A value other than the default for every key that moved into a section (the schema's own rules hold for them).
NEW_VALUES: dict[str, dict[str, Any]] = {
    "optim": {"optimizer": "adamw8bit", "lr": 2e-4, "min_lr": 1e-5, "warmup_steps": 7, "weight_decay": 0.01,
              "betas": [0.8, 0.9], "eps": 1e-7, "grad_clip": 0.5, "zero_stage": 1, "offload_optimizer": True},
    "batch": {"micro_batch_size": 3, "grad_accum_steps": 5},
    "parallel": {"num_stages": 2, "partition": [0, 3, 9], "gpu_memory_gib": 22.0, "activation_checkpoint_interval": 0,
                 "activation_checkpoint_blocks": [1], "activation_offload": [0], "inter_stage_mask": "float_additive"},
    "checkpoint": {"save_every": 3, "keep_last": 4, "save_best": "eval_loss", "save_best_mode": "min"},
    "log": {"tensorboard": False, "wandb_project": "proj"},
}
EVAL = {"every": 3, "data": [{"ann_path": "val.json"}]}  # save_best needs an evaluation


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    _warned.clear()  # each warning is printed once per process


def flat(train: dict[str, Any]) -> dict[str, Any]:
    """A ``train`` mapping in the layout of earlier versions: the sections' keys directly under ``train``."""
    out = {k: v for k, v in train.items() if k not in TRAIN_SECTIONS}
    for section in TRAIN_SECTIONS:
        out.update(train.get(section, {}))
    return out


def warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


def test_the_values_cover_every_moved_key() -> None:
    assert {s: sorted(v) for s, v in NEW_VALUES.items()} == \
        {s: sorted(f.name for f in dataclasses.fields(cls)) for s, cls in TRAIN_SECTIONS.items()}


def test_a_recipe_with_every_old_key_loads_as_the_new_layout_with_one_warning(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"base": str(DEMO_CFG), "train": {**NEW_VALUES, "eval": EVAL}}))
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"base": str(DEMO_CFG), "train": {**flat(NEW_VALUES), "eval": EVAL}}))
    want = load_config(new)
    assert warnings(capsys.readouterr().err) == []  # the new layout (and the shipped demo recipe) warn nothing
    got = load_config(old)
    assert got == want and got.train.optim.lr == 2e-4 and got.train.parallel.partition == [0, 3, 9]
    lines = warnings(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"warning: {old}: old flat train keys, read as their new names")
    for section, values in NEW_VALUES.items():
        for name in values:
            assert f"train.{name} -> train.{section}.{name}" in lines[0]


def test_every_old_key_as_an_option_is_read_as_the_new_key_with_a_warning(capsys: pytest.CaptureFixture) -> None:
    options = [f"train.{name}={json.dumps(value)}" for values in NEW_VALUES.values() for name, value in values.items()]
    options += [f"train.eval.every={EVAL['every']}", f"train.eval.data={json.dumps(EVAL['data'])}"]
    cfg = load_config(DEMO_CFG, options)
    for section, values in NEW_VALUES.items():
        got = to_dict(getattr(cfg.train, section))
        assert got == values, section
    lines = warnings(capsys.readouterr().err)
    assert len(lines) == sum(len(v) for v in NEW_VALUES.values())  # one line per old option
    for section, values in NEW_VALUES.items():
        for name in values:
            assert f"warning: --options train.{name}: old flat train key, read as train.{section}.{name} (use the " \
                   "new name)" in lines


def test_base_chains_mix_old_and_new_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each file is read by itself before the chain merges: a child's key wins whichever layout either file uses."""
    (tmp_path / "old_base.yaml").write_text(yaml.safe_dump(
        {"base": str(DEMO_CFG), "train": {"lr": 1e-3, "num_stages": 3, "keep_last": 5}}))
    (tmp_path / "new_child.yaml").write_text(yaml.safe_dump(
        {"base": "old_base.yaml", "train": {"optim": {"lr": 2e-5}}}))
    cfg = load_config(tmp_path / "new_child.yaml")
    assert (cfg.train.optim.lr, cfg.train.parallel.num_stages, cfg.train.checkpoint.keep_last) == (2e-5, 3, 5)
    assert cfg.train.optim.min_lr == 1e-5  # the demo recipe's, untouched
    lines = warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "old_base.yaml" in lines[0]

    (tmp_path / "new_base.yaml").write_text(yaml.safe_dump(
        {"base": str(DEMO_CFG), "train": {"optim": {"lr": 1e-3}, "parallel": {"num_stages": 3}}}))
    (tmp_path / "old_child.yaml").write_text(yaml.safe_dump({"base": "new_base.yaml", "train": {"lr": 2e-5}}))
    cfg = load_config(tmp_path / "old_child.yaml", ["train.optim.warmup_steps=9"])
    assert (cfg.train.optim.lr, cfg.train.parallel.num_stages, cfg.train.optim.warmup_steps) == (2e-5, 3, 9)


def test_one_key_given_both_ways_is_an_error_naming_both(tmp_path: Path) -> None:
    p = tmp_path / "both.yaml"
    p.write_text(yaml.safe_dump({"base": str(DEMO_CFG), "train": {"lr": 1e-3, "optim": {"lr": 2e-3}}}))
    with pytest.raises(ConfigError, match=r"both.yaml: `train.lr` \(the old name\) and `train.optim.lr` are both "
                                          r"given: keep `train.optim.lr`"):
        load_config(p)


@pytest.mark.parametrize("name", sorted(REMOVED_TRAIN_KEYS))
def test_a_removed_key_warns_that_it_has_no_effect(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "dead.yaml"
    p.write_text(yaml.safe_dump({"base": str(DEMO_CFG), "train": {name: 5}}))
    assert load_config(p) == load_config(DEMO_CFG)
    assert warnings(capsys.readouterr().err) == [f"warning: {p}: train.{name} has no effect (removed: "
                                                 f"{REMOVED_TRAIN_KEYS[name]}); delete it"]
    assert load_config(DEMO_CFG, [f"train.{name}=5"]) == load_config(DEMO_CFG)
    assert warnings(capsys.readouterr().err) == [f"warning: --options train.{name}: has no effect (removed: "
                                                 f"{REMOVED_TRAIN_KEYS[name]}); leave it out"]
    with pytest.raises(ConfigError, match=rf"unknown key `train.{name}x`"):  # still strict about anything else
        load_config(DEMO_CFG, [f"train.{name}x=5"])


def test_a_warning_comes_from_rank_0_only(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RANK", "1")
    load_config(DEMO_CFG, ["train.lr=1e-3"])  # every rank loads the config; one of them says so
    assert warnings(capsys.readouterr().err) == []


def _old_saved_config(cfg: Config) -> dict[str, Any]:
    """``to_dict`` of ``cfg`` as an earlier version saved it: flat train keys, and the removed ones too."""
    d = to_dict(cfg)
    return {**d, "train": {**flat(d["train"]), **{k: 1 for k in REMOVED_TRAIN_KEYS}}}


def test_a_saved_config_with_old_keys_reads_and_compares_quietly(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(DEMO_CFG, ["train.checkpoint.save_every=2"])
    old = _old_saved_config(cfg)
    assert from_dict(Config, old, source="lavis_meta.json") == cfg  # what the converters read from a checkpoint
    tag = tmp_path / "global_step2"
    tag.mkdir()
    (tag / "lavis_meta.json").write_text(json.dumps({"config": old}))
    defaults = to_dict(Config())
    _, applied = check_resume_config(tag, to_dict(cfg), defaults)
    assert applied == []  # the same run: nothing changes, nothing refused
    _, applied = check_resume_config(tag, to_dict(load_config(DEMO_CFG, ["train.optim.lr=1e-4"])), defaults)
    assert [a.split(":")[0] for a in applied] == ["train.checkpoint.save_every", "train.optim.lr"]
    with pytest.raises(RunDirError, match=r"train.batch.micro_batch_size: 8 -> 2"):  # fixed by the checkpoint
        check_resume_config(tag, to_dict(load_config(DEMO_CFG, ["train.batch.micro_batch_size=2"])), defaults)
    assert warnings(capsys.readouterr().err) == []


@pytest.mark.process
def test_a_run_directory_written_with_old_keys_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """A 2-stage run stopped after step 2 of 4; its config.yaml and checkpoint metadata rewritten as an earlier
    version wrote them (flat train keys, ``log_every``); resuming from its own config.yaml gives the losses of the
    uninterrupted run."""
    def args(out: Path, cfg: Path, *extra: str) -> list[str]:
        return ["--cfg-path", str(cfg), "--num-stages", "2", "--max-steps", "4", "--output-dir", str(out), *extra]

    options = ["--options", *COMMON, "train.batch.grad_accum_steps=1", *data_options(tiny_data)]
    full = tmp_path / "full"
    launch(2, args(full, DEMO_CFG, *options))
    out = tmp_path / "old"
    launch(2, args(out, DEMO_CFG, "--stop-at-step", "2", *options))
    assert (out / "latest").read_text() == "global_step2"
    saved = load_config(out / "config.yaml")
    (out / "config.yaml").write_text(yaml.safe_dump(_old_saved_config(saved)))
    meta_file = out / "global_step2" / "lavis_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"] = _old_saved_config(from_dict(Config, meta["config"], source=str(meta_file)))
    meta_file.write_text(json.dumps(meta))
    write_checksums(meta_file.parent)  # the edit is deliberate: the checkpoint's checksums follow it

    proc = launch(2, args(out, out / "config.yaml", "--resume"))
    log = proc.stdout + proc.stderr
    assert f"resumed from {out / 'global_step2'} at step 2" in log, log[-3000:]
    assert sum(ln.startswith("warning:") and "old flat train keys" in ln for ln in log.splitlines()) == 1, log[-3000:]
    assert (out / "latest").read_text() == "global_step4"
    assert losses(out) == losses(full)
    assert "optim" in yaml.safe_load((out / "config.yaml").read_text())["train"]  # saved again in the new layout
# old-train-keys: end
