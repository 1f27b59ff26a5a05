"""Frozen-feature cache (`python -m lavis.data.cache_features`): training from the cache equals training from pixels,
a stale cache is refused, broken media are reported, and stage 0 builds no frozen module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lavis.config.load import load_config
from lavis.data.cache_features import CacheError, FeatureCache
from lavis.data.collate import Collator
from lavis.data.conversation import template_from_config
from lavis.data.datasets import ConversationDataset, load_records
from lavis.data.tokenizer import ENDOFTEXT, load_tokenizer
from lavis.features import build_cache, check_weights, main
from lavis.model.llm import llm_hf_config
from lavis.pipeline.layers import VisionEmbedPipe
from lavis.pipeline.plan import LLM_DIMS, plan_for_config

from .conftest import PRETRAIN_CFG, data_options, losses, train

EVAL = ["data.transform.kind=eval", "data.transform.hflip=false"]


@pytest.fixture(scope="module")
def cache_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fcache") / "cache"
    assert main(["--cfg-path", str(PRETRAIN_CFG), "--out", str(out), "--workers", "0", "--dtype", "fp32",
                 "--options", *data_options(tiny_data), *EVAL]) == 0
    return out


@pytest.mark.process
def test_training_from_cache_equals_training_from_pixels(cache_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    """fp32, eval transform: a 5-step 2-stage run reading cached Q-Former outputs gives the pixel run's losses."""
    pixels = train(tmp_path, "pixels", 2, 2, gas=2, data=tiny_data, steps=5, cfg=PRETRAIN_CFG, extra=tuple(EVAL))
    cached = train(tmp_path, "cached", 2, 2, gas=2, data=tiny_data, steps=5, cfg=PRETRAIN_CFG,
                   extra=(*EVAL, f"data.feature_cache={cache_dir}"))
    a, b = losses(pixels), losses(cached)
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) / abs(x) <= 1e-5, (a, b)
    log = (tmp_path / "cached.log").read_text()
    # The plan table of the cached run counts no ViT / Q-Former weights on stage 0.
    assert "pipeline: 2 stage(s)" in log


def test_stage0_builds_no_frozen_module_and_plan_follows(cache_dir: Path, tiny_data: Path) -> None:
    cfg = load_config(PRETRAIN_CFG, [*data_options(tiny_data), *EVAL, f"data.feature_cache={cache_dir}"])
    hf = llm_hf_config(cfg.model.llm)
    full = VisionEmbedPipe(cfg.model, hf, 3, cfg.model.init_seed)
    lean = VisionEmbedPipe(cfg.model, hf, 3, cfg.model.init_seed, str(cache_dir))
    names = set(lean.state_dict())
    assert not any(n.startswith(("visual_encoder", "ln_vision", "qformer", "query_tokens")) for n in names)
    assert names == {"llm_proj.weight", "llm_proj.bias", "embed_tokens.weight"}
    for n, t in lean.state_dict().items():  # same seeded init as the full layer
        assert torch.equal(t, full.state_dict()[n]), n
    dims = {k: getattr(hf, k) for k in LLM_DIMS}
    plain = load_config(PRETRAIN_CFG, [*data_options(tiny_data), *EVAL])
    assert plan_for_config(cfg, dims, 1).costs[0].params == sum(p.numel() for p in lean.parameters())
    assert plan_for_config(plain, dims, 1).costs[0].params == sum(p.numel() for p in full.parameters())


def test_cached_features_equal_the_frozen_modules_output(cache_dir: Path, tiny_data: Path) -> None:
    opts = [*data_options(tiny_data), *EVAL]
    cfg = load_config(PRETRAIN_CFG, opts)
    tpl = template_from_config(load_tokenizer(cfg.model.llm.tokenizer), cfg)
    records = load_records(cfg.data.train[0])
    ds = ConversationDataset(records, tpl, cfg.data, cfg.model.vision.image_size)
    cached_cfg = load_config(PRETRAIN_CFG, [*opts, f"data.feature_cache={cache_dir}"])
    cds = ConversationDataset(records, tpl, cached_cfg.data, cfg.model.vision.image_size)
    hf = llm_hf_config(cfg.model.llm)
    full = VisionEmbedPipe(cfg.model, hf, tpl.placeholder_id, cfg.model.init_seed).eval()
    collate = Collator(load_tokenizer(cfg.model.llm.tokenizer).token_id(ENDOFTEXT), cfg.data.max_txt_len)
    video = next(i for i, r in enumerate(records) if r.video is not None)
    keys = [(0, 5), (video, 7), (1, 9)]
    (pixels, ids, mask), _ = collate([ds[k] for k in keys])
    (feats, ids2, _), _ = collate([cds[k] for k in keys])
    assert torch.equal(ids, ids2) and feats.shape[1:] == (8, 128)
    with torch.no_grad():
        from lavis.model.mllm import encode_queries, encode_vision

        want = encode_queries(full.qformer, full.query_tokens, encode_vision(full.visual_encoder, full.ln_vision,
                                                                             pixels))
    assert torch.allclose(feats, want, rtol=1e-5, atol=1e-6)


def test_stale_cache_and_other_transform_are_refused(cache_dir: Path, tiny_data: Path) -> None:
    cache = FeatureCache.open(cache_dir)
    other_seed = load_config(PRETRAIN_CFG, [*data_options(tiny_data), *EVAL, "model.init_seed=1"])
    with pytest.raises(CacheError, match="stale feature cache"):
        check_weights(cache, other_seed.model)
    with pytest.raises(CacheError, match="stale feature cache"):
        VisionEmbedPipe(other_seed.model, llm_hf_config(other_seed.model.llm), 3, 1, str(cache_dir))
    # Other weights from a file: the Q-Former read from a checkpoint file instead of the seeded init.
    augmented = load_config(PRETRAIN_CFG, [*data_options(tiny_data), "data.transform.kind=blip2_train"])
    with pytest.raises(CacheError, match="eval transform"):
        cache.check_transform_of(64, augmented.data)
    trainable_qformer = load_config(PRETRAIN_CFG, [*data_options(tiny_data), *EVAL, "model.qformer.frozen=false"])
    with pytest.raises(CacheError, match="qformer-level"):
        check_weights(cache, trainable_qformer.model)


def test_other_weight_file_is_refused(cache_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    """A cache built from the seeded init does not fit a config that reads the frozen weights from a checkpoint."""
    cfg = load_config(PRETRAIN_CFG, [*data_options(tiny_data), *EVAL])
    hf = llm_hf_config(cfg.model.llm)
    layer = VisionEmbedPipe(cfg.model, hf, 3, cfg.model.init_seed)
    sd = {f"qformer.{k}": v for k, v in layer.qformer.state_dict().items()}
    sd["query_tokens"] = layer.query_tokens.detach() + 1.0  # one tensor differs from the cached weights
    ckpt = tmp_path / "model.pth"
    torch.save({"model": sd}, ckpt)
    with_file = load_config(PRETRAIN_CFG, [*data_options(tiny_data), *EVAL, f"model.checkpoint={ckpt}"])
    with pytest.raises(CacheError, match="stale feature cache"):
        check_weights(FeatureCache.open(cache_dir), with_file.model)


def test_broken_media_are_reported_and_build_resumes(tiny_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    records = json.loads((data / "train.json").read_text())[:6]
    single = [i for i, r in enumerate(records) if len(r.get("images", [])) == 1][:2]
    (data / records[single[0]]["images"][0]).write_bytes(b"not an image")
    records[single[1]]["images"] = ["images/absent.png"]
    (data / "train.json").write_text(json.dumps(records))
    opts = ["--options", *data_options(data), *EVAL]
    out = tmp_path / "cache"
    assert main(["--cfg-path", str(PRETRAIN_CFG), "--out", str(out), "--workers", "0", *opts]) == 1
    text = capsys.readouterr().out
    assert "2 failure(s)" in text and "corrupt_image 1" in text and "missing_file 1" in text
    assert f"train.json:{single[0]} (id {records[single[0]]['id']}): corrupt_image" in text
    assert f"train.json:{single[1]} (id {records[single[1]]['id']}): missing_file" in text
    assert len(json.loads((out / "failures.json").read_text())) == 2
    # A record whose image failed is refused by name when read; the others read.
    cfg = load_config(PRETRAIN_CFG, [*data_options(data), *EVAL, f"data.feature_cache={out}"])
    tpl = template_from_config(load_tokenizer(cfg.model.llm.tokenizer), cfg)
    ds = ConversationDataset(load_records(cfg.data.train[0]), tpl, cfg.data, 64)
    with pytest.raises(Exception, match=f"train.json:{single[1]} .*not in the feature cache"):
        ds[(single[1], 0)]
    ok = next(i for i in range(len(records)) if i not in single)
    assert ds[(ok, 0)].pixels_NCHW.shape[1:] == (8, 128)
    # Resume: finished shards are kept, nothing is recomputed (same settings), other settings are refused.
    shards = sorted(p.name for p in out.glob("shard_*.npy"))
    findings = build_cache(cfg, out, workers=0, dtype="bf16")
    assert len(findings) == 2 and sorted(p.name for p in out.glob("shard_*.npy")) == shards
    with pytest.raises(CacheError, match="other settings"):
        build_cache(cfg, out, workers=0, dtype="fp32", views=2)


def _copy_cache(cache_dir: Path, dst: Path) -> Path:
    return Path(shutil.copytree(cache_dir, dst))


def test_truncated_shard_is_named_and_the_build_command_remakes_it(cache_dir: Path, tiny_data: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before: numpy's "mmap length is greater than file size", naming nothing. Now the shard file and the fix."""
    cache = _copy_cache(cache_dir, tmp_path / "cache")
    shard = cache / "shard_00000.npy"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CacheError) as err:
        FeatureCache.open(cache)
    assert str(err.value) == (f"{shard}: it is {size - 1000} bytes, {size} were written (truncated or damaged); "
                              f"rebuild it: python -m lavis.data.cache_features --cfg-path <your recipe> --out {cache} "
                              "(remakes only the damaged or foreign shards)")
    # The same bytes count but other content (bit rot): the checksum catches it.
    shard.write_bytes((cache_dir / "shard_00000.npy").read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(CacheError, match=f"^{shard}: its content does not match the checksum written with it"):
        FeatureCache.open(cache)
    cfg = load_config(PRETRAIN_CFG, [*data_options(tiny_data), *EVAL])
    assert build_cache(cfg, cache, workers=0, dtype="fp32") == []
    assert f"feature cache: {shard}: its content does not match the checksum" in capsys.readouterr().err
    fixed, good = FeatureCache.open(cache), FeatureCache.open(cache_dir)
    assert fixed.keys.keys() == good.keys.keys()
    path = Path(next(iter(good.keys)).rpartition("|")[0])
    assert torch.equal(fixed.get(path, 0), good.get(path, 0))


def test_shard_from_another_models_cache_is_refused(cache_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    """Before: a shard copied in from a cache of other weights was read silently."""
    other = tmp_path / "other"
    assert main(["--cfg-path", str(PRETRAIN_CFG), "--out", str(other), "--workers", "0", "--dtype", "fp32",
                 "--options", *data_options(tiny_data), *EVAL, "model.init_seed=1"]) == 0
    cache = _copy_cache(cache_dir, tmp_path / "cache")
    shard = cache / "shard_00000.npy"
    shutil.copy(other / "shard_00000.json", cache / "shard_00000.json")
    shutil.copy(other / "shard_00000.npy", shard)
    foreign = r": it belongs to another feature cache: its fingerprint differs \(weights fingerprint [0-9a-f]{12}, "
    with pytest.raises(CacheError, match=f"^{shard}{foreign}" + r"this cache's [0-9a-f]{12}\); rebuild it"):
        FeatureCache.open(cache)
    shutil.copy(cache_dir / "shard_00000.json", cache / "shard_00000.json")  # only the array swapped
    with pytest.raises(CacheError, match=f"^{shard}: its content does not match the checksum"):
        FeatureCache.open(cache)
