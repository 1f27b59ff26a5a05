"""The predecessors' spellings accepted where the meaning is the same (docs/MIGRATING.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from lavis.chat.cli import build_parser as cli_parser
from lavis.chat.cli import parse_conf
from lavis.chat.engine import GenerationSettings, choose_placement, device_from_args
from lavis.chat.webui import build_parser as web_parser


def test_conf_top_k_is_a_setting_with_a_range_check() -> None:
    s = GenerationSettings()
    assert parse_conf(["top_k=40"], s) == [] and s.top_k == 40
    assert parse_conf(["top_k=-1"], s) == ["top_k must be >= 0 (0: off), got -1"] and s.top_k == 40


def test_llm_device_map_cpu_means_the_cpu() -> None:
    dev, dtype, mode = choose_placement("auto", False, "cpu")
    assert (dev, dtype, mode) == (torch.device("cpu"), torch.float32, "single")


def test_gpu_id_and_seed_flags() -> None:
    for parser in (cli_parser(), web_parser()):
        args = parser.parse_args(["--model-type", "qwen7b_chat", "--gpu_id", "1", "-s", "7"])
        assert device_from_args(args) == "cuda:1" and args.seed == 7
    assert device_from_args(argparse.Namespace(cpu_only=True, gpu_id=1)) == "cpu"


def test_predecessor_options_keys_get_their_equivalent(tmp_path: Path) -> None:
    from lavis.config.load import ConfigError, load_config

    from .conftest import DEMO_CFG

    for key, ours in (("run.init_lr", "`train.optim.lr` here"), ("model.max_txt_len", "`data.max_txt_len` here"),
                      ("run.deepspeed_config.gradient_accumulation_steps", "`train.batch.grad_accum_steps` here"),
                      ("run.deepspeed_config.zero_optimization.stage", "`train.optim.zero_stage` here")):
        with pytest.raises(ConfigError) as e:
            load_config(DEMO_CFG, [f"{key}=3"])
        msg = str(e.value)
        assert msg.startswith(f"--options {key}: not a key of ours; ") and ours in msg and "lavis.config.migrate" in msg
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"base: {DEMO_CFG}\nmodel:\n  max_txt_len: 96\n")  # in a file of ours, too
    with pytest.raises(ConfigError, match=r"unknown key `model.max_txt_len`; .*is `data.max_txt_len` here"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match=r"unknown key `train.lrr`"):  # not a predecessor key: the usual error
        load_config(DEMO_CFG, ["train.lrr=1"])
    assert load_config(DEMO_CFG, ["data.max_txt_len=96", "model.llm.hf_config.rope_theta=10000.0"]).data.max_txt_len \
        == 96


def test_predecessor_training_flag_gets_its_equivalent(capsys: pytest.CaptureFixture) -> None:
    from lavis.engine.trainer import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--cfg-path", "x.yaml", "--llm-grad-ckpt"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --llm-grad-ckpt" in err
    assert "--options train.parallel.activation_checkpoint_interval=0" in err and "turns LLM checkpointing OFF" in err
    with pytest.raises(SystemExit):
        parse_args(["--cfg-path", "x.yaml", "--bogus"])
    assert "unrecognized arguments: --bogus\n" in capsys.readouterr().err
    assert parse_args(["--cfg-path", "x.yaml", "--options", "train.optim.lr=1"]).options == ["train.optim.lr=1"]
