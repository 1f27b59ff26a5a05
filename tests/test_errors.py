"""User errors: one ``error:`` line naming the file / record / key (lavis/cli.py), corrupt files, config
ranges, converter kind and non-finite checks, media paths outside the dataset root, the shared tokenizer resolver,
and the root cause of a multi-rank failure (one real 2-rank launch in which the higher rank fails)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lavis import cli
from lavis.config.load import ConfigError, load_config, save_config, to_dict
from lavis.convert.pipe_to_pth import cli as convert_cli
from lavis.convert.pipe_to_pth import convert
from lavis.data import check
from lavis.data.datasets import load_records
from lavis.engine import errors
from lavis.engine.checkpoint import META_FILE, table_to_json
from lavis.engine.pipe_module import layer_specs
from lavis.model.freezing import is_trainable
from lavis.model.llm import decoder_parts, llm_hf_config
from lavis.pipeline.plan import layer_table

from .conftest import DEMO_CFG, PRETRAIN_CFG, REPO, data_options


def _run_cli(main, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.run_cli(main)
    return info.value.code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the shared helper


def test_user_error_is_one_line_and_status_1(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAVIS_TRACEBACK", raising=False)

    def main() -> int:
        load_config(DEMO_CFG, ["train.checkpoint.save_every=-1"])
        return 0

    code, err = _run_cli(main, capsys)
    assert code == 1
    assert err.startswith("error: ") and "train.checkpoint.save_every must be >= 0" in err and str(DEMO_CFG) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    monkeypatch.setenv("LAVIS_TRACEBACK", "1")
    code, err = _run_cli(main, capsys)
    assert code == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


def test_a_bug_keeps_its_traceback(capsys: pytest.CaptureFixture) -> None:
    def main() -> int:
        return {}["missing"]

    code, err = _run_cli(main, capsys)
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("error: KeyError: 'missing'")
    assert _run_cli(lambda: 3, capsys)[0] == 3 and _run_cli(lambda: None, capsys)[0] == 0


def test_peer_loss_is_recognised_from_the_gloo_message() -> None:
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:19882. This is "
                        "typically caused by a remote worker crashing.")
    assert cli.is_peer_loss(gloo) and not cli.is_user_error(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise RuntimeError("pipeline send failed") from e
    except RuntimeError as wrapped:
        assert cli.is_peer_loss(wrapped)
    assert cli.is_peer_loss(BrokenPipeError()) and not cli.is_peer_loss(ValueError("bad record"))


def test_root_cause_error_file_is_what_torchrun_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def main() -> None:
        raise ValueError("/data/train.json:3 (id r3): media path '../x.jpg' resolves outside the dataset's vis_root")

    with pytest.raises(SystemExit) as info:
        errors.run_rank(main)
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: rank 1: /data/train.json:3 (id r3): media path '../x.jpg' "
                                               "resolves outside the dataset's vis_root")
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(tmp_path / "error.json"))
    summary = ChildFailedError("train_pipeline.py", {1: failure}).format_msg()
    assert "error: rank 1: /data/train.json:3 (id r3)" in summary.split("Root Cause")[1]


def test_a_rank_whose_peer_vanished_reports_only_if_nobody_stops_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(errors, "PEER_LOSS_WAIT_S", 0.0)  # no launcher here to stop it

    def main() -> None:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")

    with pytest.raises(SystemExit) as info:
        errors.run_rank(main)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "error: rank 0: lost the connection to another rank" in err
    assert "lost the connection" in json.loads((tmp_path / "error.json").read_text())["message"]["message"]


@pytest.mark.process
def test_root_cause_of_a_two_rank_failure_is_the_failing_rank_even_when_it_is_the_higher_one() -> None:
    """Rank 1 fails, rank 0 then loses its connection; torchrun must name rank 1 (it loses timestamp ties)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("rank_failure_script.py"))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    root = text.rsplit("Root Cause (first observed failure):", 1)[-1]
    assert "rank      : 1" in root and "error: rank 1: bad record in /data/ann.json:7 (id r7)" in root, text
    assert "Connection closed by peer" not in text and "]: Traceback" not in text, text


# ------------------------------------------------------------------------------------------------ config ranges


@pytest.mark.parametrize("option, key", [
    ("train.checkpoint.save_every=-1", "train.checkpoint.save_every"),
    ("train.optim.warmup_steps=-2", "train.optim.warmup_steps"),
    ("train.optim.lr=0", "train.optim.lr"),
    ("train.optim.min_lr=1.0", "train.optim.min_lr"),
    ("train.checkpoint.keep_last=0", "train.checkpoint.keep_last"),
    ("train.optim.grad_clip=-1", "train.optim.grad_clip"),
    ("train.optim.betas=[0.9,1.5]", "train.optim.betas"),
    ("data.pad_to_multiple_of=0", "data.pad_to_multiple_of"),
    ("data.max_txt_len=0", "data.max_txt_len"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.train.0.weight=0", "data.train[].weight"),
    ("data.transform.min_scale=0", "data.transform.min_scale"),
    ("model.qformer.num_query_tokens=0", "model.qformer.num_query_tokens"),
    ("model.vision.patch_size=0", "model.vision.patch_size"),
])
def test_out_of_range_values_name_the_key(option: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"{re.escape(str(DEMO_CFG))}.*{re.escape(key)}.* must be"):
        load_config(DEMO_CFG, [option])


def test_save_every_zero_means_only_at_the_end() -> None:
    assert load_config(DEMO_CFG, ["train.checkpoint.save_every=0"]).train.checkpoint.save_every == 0


# ------------------------------------------------------------------------------------------------ data


def test_non_utf8_annotation_names_the_file(tmp_path: Path) -> None:
    from lavis.config.schema import DatasetConfig

    ann = tmp_path / "latin1.json"
    ann.write_bytes('[{"conversations": [{"from": "human", "value": "caf\u00e9"}]}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{ann}: not UTF-8 text \\(byte 0xe9 at offset 51\\)"):
        load_records(DatasetConfig(ann_path=str(ann)))


def _records_with_media(tmp_path: Path, image: str) -> Path:
    turns = [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "yes"}]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"id": "ok", "images": ["images/a.png"], "conversations": turns},
                               {"id": "evil", "images": [image], "conversations": turns}]))
    return ann


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "images/../../secret.png"])
def test_media_outside_the_dataset_root_is_refused(tmp_path: Path, image: str) -> None:
    from lavis.config.schema import DatasetConfig

    ds = DatasetConfig(ann_path=str(_records_with_media(tmp_path, image)), vis_root=str(tmp_path / "root"))
    with pytest.raises(ValueError, match=rf"ann.json:1 \(id evil\): media path '{image}' resolves to .* outside "
                                         rf"the dataset's vis_root .*data.allow_outside_root"):
        load_records(ds)
    recs = load_records(ds, allow_outside_root=True)
    assert recs[1].images == [tmp_path / "root" / image]


def test_checker_reports_outside_paths_and_honours_allow_outside_root(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    ann = _records_with_media(tmp_path, "../../etc/passwd")
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(root / "images/a.png")
    opts = ["--options", f"data.train.0.ann_path={ann}", f"data.train.0.vis_root={root}"]
    assert check.main(["--cfg-path", str(DEMO_CFG), "--tokenizer", "none", *opts]) == 1
    assert "outside the dataset's vis_root" in capsys.readouterr().out
    assert check.main(["--cfg-path", str(DEMO_CFG), "--tokenizer", "none", *opts,
                       "data.allow_outside_root=true"]) == 1  # now read: /etc/passwd is not an image
    out = capsys.readouterr().out
    assert "outside the dataset's vis_root" not in out and "passwd" in out


def test_check_with_tokenizer_none_skips_the_length_check(tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    assert check.main(["--cfg-path", str(DEMO_CFG), "--tokenizer", "none", "--workers", "1",
                       "--options", *data_options(tiny_data)]) == 0
    captured = capsys.readouterr()
    assert "token lengths are not checked" in captured.err and "0 bad" in captured.out


# ------------------------------------------------------------------------------------------------ tokenizer resolver


def test_inspect_and_check_find_the_runs_tokenizer_from_another_directory(
        tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from lavis.data.tokenizer import load_tokenizer
    from lavis.inspect import main as inspect_main

    run = tmp_path / "train_cwd" / "output" / "run"
    run.mkdir(parents=True)
    load_tokenizer("builtin:shapes").save_to(run)
    cfg = load_config(DEMO_CFG, data_options(tiny_data))
    # as train_pipeline.py writes it: the tokenizer path relative to the directory training ran in
    cfg = replace(cfg, model=replace(cfg.model, llm=replace(cfg.model.llm, tokenizer="output/run/tokenizer.json")))
    save_config(cfg, run / "config.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert inspect_main(["--cfg-path", str(run / "config.yaml")]) == 0
    assert f"tokenizer {run / 'tokenizer.json'}" in capsys.readouterr().out
    assert check.main(["--cfg-path", str(run / "config.yaml"), "--workers", "1"]) == 0


# ------------------------------------------------------------------------------------------------ checkpoints


def _fake_checkpoint(run: Path, cfg_path: Path) -> Path:
    """A ``global_step1`` as train_pipeline.py writes it (trainable weights only, per layer), without training."""
    from lavis.data.tokenizer import load_tokenizer

    cfg = load_config(cfg_path)
    hf = llm_hf_config(cfg.model.llm)
    placeholder = load_tokenizer(cfg.model.llm.tokenizer).token_id(cfg.model.llm.image_placeholder)
    table = layer_table(hf.num_hidden_layers)
    tag = run / "global_step1"
    tag.mkdir(parents=True)
    for i, spec in enumerate(layer_specs(cfg.model, hf, decoder_parts(hf), placeholder)):
        state = {k: v for k, v in spec.build().state_dict().items() if is_trainable(table[i].to_plain(k), cfg.model)}
        torch.save(state, tag / f"layer_{i:02d}-model_states.pt")
    meta = {"layers": table_to_json(table), "config": to_dict(cfg), "tokenizer": "tokenizer.json",
            "placeholder_id": placeholder, "step": 1, "tag": "global_step1"}
    (tag / META_FILE).write_text(json.dumps(meta))
    (run / "latest").write_text("global_step1")
    return tag


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sft") / "run"
    _fake_checkpoint(run, DEMO_CFG)
    return run


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrain") / "run"
    _fake_checkpoint(run, PRETRAIN_CFG)
    return run


def _copy_run(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_converters_refuse_the_wrong_kind_of_run(sft_run: Path, pretrain_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="also trained vision, qformer, llm: those trained weights would be left out; "
                                         "use pipemodel2pth.py .*--allow-kind-mismatch"):
        convert(sft_run, "proj", tmp_path / "p.pth")
    assert "SFT run (trained: vision, qformer, projection, llm)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only the projection trained.*use pipe_proj2pth.py"):
        convert(pretrain_run, "model", tmp_path / "m.pth")
    assert "pretrain run (trained: projection)" in capsys.readouterr().err
    out = convert(sft_run, "proj", tmp_path / "p.pth", allow_kind_mismatch=True)
    assert set(torch.load(out, weights_only=True)) == {"llm_proj.weight", "llm_proj.bias"}
    assert "warning: pipe_proj2pth.py writes only the projection" in capsys.readouterr().err
    assert convert(pretrain_run, "proj", tmp_path / "ok.pth").is_file()


def test_converter_cli_prints_one_error_line(sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _run_cli(lambda: convert_cli("proj", "", ["--ckpt-dir", str(sft_run), "--out", str(tmp_path / "x")]),
                         capsys)
    assert code == 1 and err.rstrip().splitlines()[-1].startswith("error: ") and "Traceback" not in err


def test_converters_refuse_nonfinite_weights(sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _copy_run(sft_run, tmp_path / "run")
    f = run / "global_step1" / "layer_02-model_states.pt"
    state = torch.load(f, weights_only=True)
    key = sorted(state)[0]
    state[key][0] = float("nan")
    torch.save(state, f)
    nan_key = re.escape("['llm_model.model.layers.1.input_layernorm.weight']")
    with pytest.raises(ValueError, match=rf"1 weight\(s\) hold NaN or inf: {nan_key}.*--allow-nonfinite"):
        convert(run, "model", tmp_path / "m.pth")
    assert convert(run, "model", tmp_path / "m.pth", allow_nonfinite=True).is_file()
    assert "warning: 1 weight(s) hold NaN or inf" in capsys.readouterr().err


def test_corrupt_checkpoint_files_are_named(sft_run: Path, tmp_path: Path) -> None:
    run = _copy_run(sft_run, tmp_path / "run")
    layer = run / "global_step1" / "layer_01-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"layer file: {layer} \\(100 bytes\\) is not a readable torch file"):
        convert(run, "model", tmp_path / "m.pth")
    meta = run / "global_step1" / META_FILE
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(ValueError, match=f"{meta}: not valid JSON"):
        convert(run, "model", tmp_path / "m.pth")


@pytest.mark.parametrize("damage, message", [
    ("empty", r"is empty \(0 bytes\)"),
    ("truncated", r"\(1000 bytes\) is not a readable torch file: truncated or corrupt"),
    ("directory", r"is a directory; give the \.pth file itself"),
])
def test_bad_dash_c_file_is_named(sft_run: Path, tmp_path: Path, damage: str, message: str) -> None:
    from lavis.inspect import main as inspect_main

    pth = tmp_path / "model.pth"
    if damage == "directory":
        pth.mkdir()
    else:
        good = convert(sft_run, "model", tmp_path / "good.pth")
        pth.write_bytes(b"" if damage == "empty" else good.read_bytes()[:1000])
    with pytest.raises((ValueError, IsADirectoryError), match=f"model.checkpoint / -c: {pth} {message}"):
        inspect_main(["--cfg-path", str(DEMO_CFG), "-c", str(pth)])


@pytest.mark.parametrize("front_end", ["webui", "serve"])
def test_server_front_ends_exit_1_on_input_errors(front_end: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    """README: every input error is one `error:` line and exit status 1 (2 is argparse's, for malformed lines)."""
    if front_end == "webui":
        from lavis.chat.webui import main
    else:
        from lavis.serve.app import main
    assert main(["--cfg-path", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err
