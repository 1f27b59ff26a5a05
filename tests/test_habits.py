"""The predecessors' spellings accepted where the meaning is the same (docs/MIGRATING.md)."""

from __future__ import annotations

import argparse

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
