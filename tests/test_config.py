"""Strict config loading, overrides and the derived DeepSpeed dict."""

from __future__ import annotations

from pathlib import Path

import pytest

from lavis.config.load import ConfigError, deepspeed_config, load_config, save_config
from lavis.config.schema import BatchConfig, OptimConfig, TrainConfig

from .conftest import DEMO_CFG, PRETRAIN_CFG


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_recipes_load() -> None:
    cfg = load_config(DEMO_CFG)
    assert cfg.model.qformer.num_query_tokens == 8 and cfg.train.parallel.num_stages == 2
    pre = load_config(PRETRAIN_CFG)
    assert pre.model.llm.frozen and pre.model.vision.frozen and not pre.model.projection.frozen


def test_unknown_key_names_file_key_and_closest(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  learning_rate: 0.1\n  max_step: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.learning_rate" in msg


def test_misspelled_key_suggests_closest(tmp_path: Path) -> None:
    p = write(tmp_path, "model:\n  qformer:\n    num_query_token: 16\n")
    with pytest.raises(ConfigError,
                       match=r"model\.qformer\.num_query_token.*did you mean `model\.qformer\.num_query_tokens`"):
        load_config(p)


def test_wrong_types_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps.*integer"):
        load_config(write(tmp_path, "train:\n  max_steps: ten\n"))
    with pytest.raises(ConfigError, match=r"train\.precision.*one of"):
        load_config(write(tmp_path, "train:\n  precision: fp8\n"))
    with pytest.raises(ConfigError, match=r"frozen.*true or false"):
        load_config(write(tmp_path, "model:\n  vision:\n    frozen: 1\n"))


def test_post_init_validation_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(write(tmp_path, "model:\n  vision:\n    image_size: 65\n    patch_size: 8\n"))


def test_overrides_and_list_index(tmp_path: Path) -> None:
    cfg = load_config(DEMO_CFG, ["train.optim.lr=1e-3", "data.train.0.ann_path=x.json",
                                 "train.parallel.partition=[0,2,5]"])
    assert cfg.train.optim.lr == 1e-3 and cfg.data.train[0].ann_path == "x.json"
    assert cfg.train.parallel.partition == [0, 2, 5]
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(DEMO_CFG, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEMO_CFG, ["train.optim.lr"])


def test_override_values_are_never_evaluated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.optim.lr"):
        load_config(DEMO_CFG, ["train.optim.lr=__import__('os').system('echo pwned')"])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(DEMO_CFG)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_deepspeed_dict_is_derived() -> None:
    t = TrainConfig(precision="bf16", batch=BatchConfig(micro_batch_size=4, grad_accum_steps=8),
                    optim=OptimConfig(zero_stage=1, grad_clip=0.5))
    ds = deepspeed_config(t, dp_world_size=2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 8 and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    assert ds["gradient_clipping"] == 0.5
    # fp32 without ZeRO: DeepSpeed's PP norm is wrong, so its clipping is off and ours is used.
    fp32 = TrainConfig(precision="fp32", optim=OptimConfig(grad_clip=1.0))
    assert deepspeed_config(fp32, 1)["gradient_clipping"] == 0.0


def test_base_recipe_is_merged_under_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.yaml").write_text(
        "model:\n  llm: {hf_config: {model_type: qwen2, hidden_size: 64}, system_prompt: base prompt}\n"
        "train: {optim: {lr: 1.0e-3, betas: [0.9, 0.95]}}\n")
    (tmp_path / "mid.yaml").write_text("base: models/m.yaml\ntrain: {max_steps: 7}\n")
    (tmp_path / "run.yaml").write_text("base: mid.yaml\ntrain: {optim: {lr: 2.0e-5, betas: [0.9, 0.99]}}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.model.llm.hf_config == {"model_type": "qwen2", "hidden_size": 64}
    assert cfg.model.llm.system_prompt == "base prompt"
    assert (cfg.train.optim.lr, cfg.train.max_steps, cfg.train.optim.betas) == (2e-5, 7, (0.9, 0.99))  # lists replace


def test_base_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml not found \(named by `base:` in"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "b.yaml")


# --- values are literals; every YAML error is one line naming the file ------------------------------------------


def test_interpolation_is_refused_in_a_file_and_in_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAVIS_TEST_SECRET", "hunter2")
    p = write(tmp_path, f"base: {DEMO_CFG}\ntrain:\n  output_dir: runs/${{oc.env:LAVIS_TEST_SECRET}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "`train.output_dir`" in str(e.value) and "literals" in str(e.value)
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"--options: `train.output_dir`.*interpolation is not supported"):
        load_config(DEMO_CFG, ["train.output_dir=${oc.env:LAVIS_TEST_SECRET}"])
    with pytest.raises(ConfigError, match=r"`model.llm.system_prompt\[1\]`"):  # inside a list too
        load_config(DEMO_CFG, ["model.llm.system_prompt=[a, '${train.optim.lr}']"])


def test_literal_dollar_text_that_is_not_interpolation_is_kept(tmp_path: Path) -> None:
    cfg = load_config(DEMO_CFG, ["model.llm.system_prompt=costs $5 {not a field}"])
    assert cfg.model.llm.system_prompt == "costs $5 {not a field}"


def test_python_tags_and_alias_bombs_are_one_line_naming_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2: invalid YAML: could not determine a constructor.*python/object"):
        load_config(p)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, n in zip("abcdefgh", "bcdefghi"))
    p = write(tmp_path, bomb)
    with pytest.raises(ConfigError, match=rf"^{p}:2: invalid YAML: alias \*a is not allowed"):
        load_config(p)
    p = write(tmp_path, "train:\n  lr: [1, 2\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:3: invalid YAML") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^bad --options item 'train.optim.lr=\[1': invalid YAML"):
        load_config(DEMO_CFG, ["train.optim.lr=[1"])
    with pytest.raises(ConfigError, match=r"^bad --options item .*could not determine a constructor"):
        load_config(DEMO_CFG, ["train.optim.lr=!!python/object/apply:os.system [x]"])
    p = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


@pytest.mark.process
def test_a_bad_config_file_is_one_error_line_and_status_1(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import REPO

    p = write(tmp_path, "a: &a [x, x]\nb: [*a, *a]\n")
    r = subprocess.run([sys.executable, "-m", "lavis.inspect", "--cfg-path", str(p)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {p}:2: invalid YAML: alias *a is not allowed in a config file "
                                             "(anchors and aliases are refused): write the value out"]
