"""Vision-side weights: synthetic LAVIS-layout files -> readers -> our ViT / Q-Former, with LAVIS numerics.

The references below are written from docs/FORMATS.md sections 1-2 (not from timm or transformers) and read the raw
LAVIS-named file tensors, so a wrong rename, bias layout, eps or activation in our path shows up as a difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lavis.config.schema import ModelConfig, QFormerConfig, VisionConfig
from lavis.model.eva_vit import build_eva_vit, build_ln_vision, vit_features
from lavis.model.qformer import build_qformer, build_query_tokens, qformer_queries
from lavis.testing.synthetic_vision import (
    blip2_file_shapes,
    eva_vit_file_shapes,
    write_synthetic_blip2,
    write_synthetic_eva_vit,
)
from lavis.weights.vision import (
    BLIP2_IGNORED,
    interpolate_pos_embed,
    plan_blip2,
    plan_eva_vit,
    read_blip2,
    read_eva_vit,
)

VIS = VisionConfig(image_size=28, patch_size=7, width=64, depth=2, num_heads=4, mlp_hidden=160)
QF = QFormerConfig(hidden_size=48, num_layers=3, num_heads=4, intermediate_size=96, num_query_tokens=5)
MODEL = ModelConfig(vision=VIS, qformer=QF)


def vit_want(vit: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {"visual_encoder." + k: tuple(v.shape) for k, v in vit.state_dict().items()}


def blip2_want(qformer: torch.nn.Module, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    want = {"qformer." + k: tuple(v.shape) for k, v in qformer.state_dict().items()}
    want["query_tokens"] = (1, cfg.qformer.num_query_tokens, cfg.qformer.hidden_size)
    want["ln_vision.weight"] = want["ln_vision.bias"] = (cfg.vision.width,)
    return want


def strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vision_weights")
    write_synthetic_eva_vit(d / "eva_vit_g.pth", VIS, clip_head=True, seed=1)
    write_synthetic_blip2(d / "blip2.pth", MODEL, seed=2)
    return {"eva": d / "eva_vit_g.pth", "blip2": d / "blip2.pth"}


# ---------------------------------------------------------------- independent references (docs/FORMATS.md facts)


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def heads(x_NLW: torch.Tensor, n: int) -> torch.Tensor:
    b, length, w = x_NLW.shape
    return x_NLW.reshape(b, length, n, w // n).transpose(1, 2)  # head-major rows: [N, heads, L, head_dim]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    q, k, v = heads(q, n), heads(k, n), heads(v, n)
    a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    o = a @ v
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


def ref_eva(sd: dict[str, torch.Tensor], cfg: VisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """EVA ViT-g as LAVIS: conv patches, cls first, abs pos, pre-norm blocks (eps 1e-6), bias cat(q, 0, v), erf GELU."""
    sd = {k: v.float() for k, v in sd.items()}
    w = cfg.width
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(cfg.depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (w,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = h @ p["attn.qkv.weight"].T + torch.cat([p["attn.q_bias"], torch.zeros(w), p["attn.v_bias"]])
        q, k, v = qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]
        x = x + attend(q, k, v, cfg.num_heads) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        h = F.layer_norm(x, (w,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + gelu_erf(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x


def ref_qformer(sd: dict[str, torch.Tensor], cfg: QFormerConfig, feats_NPW: torch.Tensor) -> torch.Tensor:
    """LAVIS query-only Q-Former: LN(query_tokens), per layer post-LN self-attn, cross-attn every
    ``cross_attention_freq``-th layer, FFN intermediate_query/output_query; BERT eps 1e-12, erf GELU."""
    h = cfg.hidden_size

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (h,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-12)

    def block(x: torch.Tensor, kv: torch.Tensor, p: str) -> torch.Tensor:
        ctx = attend(lin(x, p + "self.query"), lin(kv, p + "self.key"), lin(kv, p + "self.value"), cfg.num_heads)
        return ln(lin(ctx, p + "output.dense") + x, p + "output.LayerNorm")

    x = ln(sd["query_tokens"].expand(feats_NPW.shape[0], -1, -1), "Qformer.bert.embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        b = f"Qformer.bert.encoder.layer.{i}."
        x = block(x, x, b + "attention.")
        if i % cfg.cross_attention_freq == 0:
            x = block(x, feats_NPW, b + "crossattention.")
        y = lin(gelu_erf(lin(x, b + "intermediate_query.dense")), b + "output_query.dense")
        x = ln(y + x, b + "output_query.LayerNorm")
    return x


# ---------------------------------------------------------------- EVA ViT file


def test_eva_file_loads_strictly_and_reports_extras(files: dict[str, Path]) -> None:
    vit = build_eva_vit(VIS)
    tensors, report = read_eva_vit(files["eva"], VIS, vit_want(vit))
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    vit.load_state_dict(strip(tensors, "visual_encoder."), strict=True)  # every model key, nothing else
    assert len(report.loaded) == len(vit.state_dict())
    extra = {k for k in report.ignored if k.startswith(f"blocks.{VIS.depth}.")}
    assert len(extra) == 13 and all("first 2 EVA-CLIP-g blocks" in report.ignored[k] for k in extra)
    assert set(report.ignored) - extra == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert "final LayerNorm" in report.ignored["norm.weight"] and "head" in report.ignored["head.weight"]
    assert "ignored 13: block 2" in report.format()


def test_eva_wrong_width_is_a_reported_mismatch(tmp_path: Path) -> None:
    wide = VisionConfig(image_size=28, patch_size=7, width=96, depth=2, num_heads=4, mlp_hidden=160)
    write_synthetic_eva_vit(tmp_path / "wide.pth", wide)
    tensors, report = read_eva_vit(tmp_path / "wide.pth", VIS, vit_want(build_eva_vit(VIS)))
    assert not report.ok and report.mismatched and "visual_encoder.cls_token" not in tensors
    byname = {m.key: m for m in report.mismatched}
    assert "file [96, 3, 7, 7] vs model [64, 3, 7, 7]" in byname["visual_encoder.patch_embed.proj.weight"].describe()
    assert any("model.vision" in n and "EVA ViT-g is width 1408" in n for n in report.notes)
    with pytest.raises(ValueError, match="shape mismatch: visual_encoder"):
        report.raise_if_bad()


def test_eva_more_than_one_extra_block_is_unexpected(tmp_path: Path) -> None:
    deep = VisionConfig(image_size=28, patch_size=7, width=64, depth=3, num_heads=4, mlp_hidden=160)
    write_synthetic_eva_vit(tmp_path / "deep.pth", deep)  # blocks 0..3 on a depth-2 model
    _, report = read_eva_vit(tmp_path / "deep.pth", VIS, vit_want(build_eva_vit(VIS)))
    assert not report.ok and not report.ignored
    assert {k.split(".")[1] for k in report.unexpected} == {"2", "3"}
    assert any("model.vision.depth is 2" in n for n in report.notes)


def test_eva_missing_keys_and_wrapper(tmp_path: Path, files: dict[str, Path]) -> None:
    sd = torch.load(files["eva"], weights_only=True)
    del sd["blocks.1.attn.q_bias"]
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    tensors, report = read_eva_vit(tmp_path / "wrapped.pth", VIS, vit_want(build_eva_vit(VIS)))
    assert report.missing == ["visual_encoder.blocks.1.attn.q_bias"] and not report.ok
    assert any("'state_dict' entry" in n and "epoch" in n for n in report.notes)
    assert "visual_encoder.blocks.0.attn.q_bias" in tensors


def test_missing_file_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.vision.checkpoint: .*nope.pth does not exist"):
        read_eva_vit(tmp_path / "nope.pth", VIS, {})
    with pytest.raises(FileNotFoundError, match="model.qformer.checkpoint"):
        read_blip2(tmp_path / "nope.pth", MODEL, {})


def test_vit_matches_reference_math(files: dict[str, Path]) -> None:
    vit = build_eva_vit(VIS).eval()
    tensors, _ = read_eva_vit(files["eva"], VIS, vit_want(vit))
    vit.load_state_dict(strip(tensors, "visual_encoder."))
    pixels = torch.randn(2, 3, VIS.image_size, VIS.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vit_features(vit, pixels)
        ref = ref_eva(torch.load(files["eva"], weights_only=True), VIS, pixels)
    assert ours.shape == (2, 1 + (VIS.image_size // VIS.patch_size) ** 2, VIS.width)
    assert ref.abs().mean() > 0.1  # the weights make a non-trivial forward
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * VIS.depth and {m.eps for m in norms} == {1e-6}  # no final norm


def test_fp16_vision_must_be_frozen() -> None:
    with pytest.raises(ValueError, match="precision: fp16 needs model.vision.frozen: true"):
        VisionConfig(precision="fp16", frozen=False)


def test_vit_fp16_layout_keeps_norms_fp32(files: dict[str, Path]) -> None:
    cfg = VisionConfig(**{**VIS.__dict__, "precision": "fp16"})
    vit = build_eva_vit(cfg).eval()
    tensors, report = read_eva_vit(files["eva"], cfg, vit_want(vit))
    assert report.ok
    vit.load_state_dict(strip(tensors, "visual_encoder."))
    dtypes = {k: v.dtype for k, v in vit.state_dict().items()}
    half = {k for k, d in dtypes.items() if d == torch.float16}
    assert half == {k for k in dtypes if any(s in k for s in ("patch_embed.proj", "attn.qkv", "attn.proj", "mlp.fc"))}
    for k in ("cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.q_bias", "blocks.1.attn.v_bias"):
        assert dtypes[k] == torch.float32
    pixels = torch.randn(2, 3, VIS.image_size, VIS.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vit_features(vit, pixels)
        ref = ref_eva(torch.load(files["eva"], weights_only=True), VIS, pixels)
    assert ours.dtype == torch.float32  # residual stream stays fp32 (fp32 cls_token / pos_embed), as in LAVIS
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)


def test_pos_embed_interpolation_changes_grid_and_keeps_cls(files: dict[str, Path]) -> None:
    big = VisionConfig(**{**VIS.__dict__, "image_size": 42})  # grid 4x4 in the file -> 6x6
    vit = build_eva_vit(big).eval()
    tensors, report = read_eva_vit(files["eva"], big, vit_want(vit))
    assert report.ok and any("interpolated 4x4 -> 6x6" in n for n in report.notes)
    file_pos = torch.load(files["eva"], weights_only=True)["pos_embed"]
    pos = tensors["visual_encoder.pos_embed"]
    assert pos.shape == (1, 37, VIS.width) and pos.dtype == torch.float32
    torch.testing.assert_close(pos[:, :1], file_pos[:, :1].float())
    vit.load_state_dict(strip(tensors, "visual_encoder."))
    assert vit_features(vit, torch.randn(1, 3, 42, 42)).shape == (1, 37, VIS.width)
    # A constant grid stays constant (bicubic weights sum to 1); the same grid size is the identity.
    const = torch.cat([torch.zeros(1, 1, 3), torch.full((1, 16, 3), 2.5)], dim=1)
    torch.testing.assert_close(interpolate_pos_embed(const, 6)[:, 1:], torch.full((1, 36, 3), 2.5))
    torch.testing.assert_close(interpolate_pos_embed(file_pos, 4), file_pos.float())
    _, same = read_eva_vit(files["eva"], VIS, vit_want(build_eva_vit(VIS)))
    assert not any("interpolated" in n for n in same.notes)


# ---------------------------------------------------------------- BLIP-2 file


def test_qformer_matches_reference_math(files: dict[str, Path]) -> None:
    qf = build_qformer(QF, VIS.width).eval()
    ln_vision = build_ln_vision(VIS)
    query_tokens = build_query_tokens(QF)
    tensors, report = read_blip2(files["blip2"], MODEL, blip2_want(qf, MODEL))
    assert report.ok, report.format()
    qf.load_state_dict(strip(tensors, "qformer."), strict=True)
    ln_vision.load_state_dict(strip(tensors, "ln_vision."), strict=True)
    query_tokens.data.copy_(tensors["query_tokens"])

    vit = build_eva_vit(VIS).eval()
    vit.load_state_dict(strip(read_eva_vit(files["eva"], VIS, vit_want(vit))[0], "visual_encoder."))
    pixels = torch.randn(3, 3, VIS.image_size, VIS.image_size, generator=torch.Generator().manual_seed(1))
    sd = torch.load(files["blip2"], weights_only=True)["model"]
    with torch.no_grad():
        ours = qformer_queries(qf, query_tokens, ln_vision(vit_features(vit, pixels)))
        feats = F.layer_norm(ref_eva(torch.load(files["eva"], weights_only=True), VIS, pixels), (VIS.width,),
                             sd["ln_vision.weight"], sd["ln_vision.bias"], eps=1e-5)
        ref = ref_qformer(sd, QF, feats)
    assert ours.shape == (3, QF.num_query_tokens, QF.hidden_size) and ref.std() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ln_vision.eps == 1e-5
    assert {m.eps for m in qf.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}


def test_blip2_every_key_loaded_or_ignored_with_reason(tmp_path: Path) -> None:
    write_synthetic_blip2(tmp_path / "b.pth", MODEL, text_branch=True)
    sd = torch.load(tmp_path / "b.pth", weights_only=True)
    qf = build_qformer(QF, VIS.width)
    tensors, report = read_blip2(tmp_path / "b.pth", MODEL, blip2_want(qf, MODEL))
    assert report.ok and len(tensors) == len(report.loaded) == len(blip2_want(qf, MODEL))
    assert len(report.loaded) + len(report.ignored) == len(sd["model"])
    assert all(report.ignored.values())
    for k in ("Qformer.bert.embeddings.position_ids", "t5_proj.weight",
              "Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.encoder.layer.1.output.dense.weight",
              "Qformer.cls.predictions.bias"):
        assert k in report.ignored
    assert "position-id" in report.ignored["Qformer.bert.embeddings.position_ids"]
    assert "FlanT5" in report.ignored["t5_proj.bias"]

    sd["model"]["Qformer.bert.encoder.layer.0.attention.self.rel_bias"] = torch.zeros(3)
    sd["model"]["llm_proj.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "b2.pth")
    _, bad = read_blip2(tmp_path / "b2.pth", MODEL, blip2_want(qf, MODEL))
    assert sorted(bad.unexpected) == ["Qformer.bert.encoder.layer.0.attention.self.rel_bias", "llm_proj.weight"]
    assert not bad.ok and "unexpected: llm_proj.weight" in bad.format()


def test_blip2_query_count_and_missing_cross_attention(tmp_path: Path) -> None:
    other = ModelConfig(vision=VIS, qformer=QFormerConfig(**{**QF.__dict__, "num_query_tokens": 32,
                                                                "cross_attention_freq": 3}))
    write_synthetic_blip2(tmp_path / "b.pth", other)
    _, report = read_blip2(tmp_path / "b.pth", MODEL, blip2_want(build_qformer(QF, VIS.width), MODEL))
    assert [m.key for m in report.mismatched] == ["query_tokens"]
    assert any("the file has 32 queries, model.qformer.num_query_tokens is 5" in n for n in report.notes)
    # freq 3 has cross-attention in layers 0 only (of 3); the model (freq 2) also wants it in layer 2.
    assert report.missing and all(k.startswith("qformer.encoder.layer.2.crossattention.") for k in report.missing)


def test_blip2_with_a_vit_inside(tmp_path: Path, files: dict[str, Path]) -> None:
    sd = torch.load(files["blip2"], weights_only=True)
    eva = torch.load(files["eva"], weights_only=True)
    sd["model"] |= {"visual_encoder." + k: v for k, v in eva.items()}
    torch.save(sd, tmp_path / "with_vit.pth")
    vit, qf = build_eva_vit(VIS), build_qformer(QF, VIS.width)
    want = blip2_want(qf, MODEL) | vit_want(vit)

    tensors, report = read_blip2(tmp_path / "with_vit.pth", MODEL, want)  # vision.checkpoint unset: read it here
    assert report.ok and len(tensors) == len(want)
    assert "visual_encoder.blocks.2.attn.qkv.weight" in report.ignored  # the extra block, as for eva_vit_g.pth
    vit.load_state_dict(strip(tensors, "visual_encoder."), strict=True)

    with_ckpt = ModelConfig(vision=VisionConfig(**{**VIS.__dict__, "checkpoint": "cache/ckpt/eva/eva_vit_g.pth"}),
                            qformer=QF)
    tensors, report = read_blip2(tmp_path / "with_vit.pth", with_ckpt, want)
    assert report.ok and not any(k.startswith("visual_encoder.") for k in tensors)
    assert "model.vision.checkpoint" in report.ignored["visual_encoder.cls_token"]


def test_full_size_layouts_match_the_model_without_allocating() -> None:
    """Default (ViT-g, BLIP-2) configs built on the meta device want exactly what the synthetic layouts provide."""
    cfg = ModelConfig()
    with torch.device("meta"):
        vit = build_eva_vit(cfg.vision)
        qf = build_qformer(cfg.qformer, cfg.vision.width)
    assert vit.cls_token.is_meta and tuple(vit.blocks[0].mlp.fc1.weight.shape) == (6144, 1408)
    take, report = plan_eva_vit(eva_vit_file_shapes(cfg.vision), cfg.vision, vit_want(vit))
    assert report.ok and len(take) == len(vit.state_dict()) == 2 + 2 + 39 * 13
    assert set(report.ignored) == {k for k in eva_vit_file_shapes(cfg.vision) if k.startswith("blocks.39.")}
    shapes = blip2_file_shapes(cfg, text_branch=True)
    assert shapes["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] == (768, 1408)
    take, report = plan_blip2(shapes, cfg, blip2_want(qf, cfg))
    assert report.ok and len(take) == len(blip2_want(qf, cfg))
    assert len(take) + len(report.ignored) == len(shapes)
    assert {r for r in report.ignored.values()} <= set(BLIP2_IGNORED.values())
