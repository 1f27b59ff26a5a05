"""LLM weights: Qwen v1 key map vs an independent Qwen v1 reference, shard formats, per-stage reads, predecessors'
checkpoints, and every preset's full-width layout checked on shapes alone."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import lavis.weights.llm as llm_weights
from lavis.config.load import load_config
from lavis.config.presets import model_types, preset_path
from lavis.config.schema import LLMConfig
from lavis.engine.pipe_module import layer_specs
from lavis.model.llm import build_llm, decoder_parts, llm_hf_config, to_qwen_v1_names
from lavis.model.mllm import MultimodalLM
from lavis.pipeline.layers import load_layer_weights
from lavis.pipeline.plan import layer_table
from lavis.testing.synthetic import (
    LLM_CONFIGS,
    TINY_OPTIONS,
    llm_config_json,
    llm_file_shapes,
    write_minigpt4,
    write_mpp_pretrain,
    write_mpp_sft,
    write_preset,
)
from lavis.testing.synthetic_vision import blip2_file_shapes, eva_vit_file_shapes
from lavis.weights.base import copy_into, default_init_keys, load_weights, model_shapes
from lavis.weights.checkpoint import read_checkpoint
from lavis.weights.llm import LLMFiles, plan_llm, read_llm
from lavis.weights.vision import plan_blip2, plan_eva_vit

# --- an independent Qwen v1 reference (docs/FORMATS.md section 5), tiny sizes -----------------------------------------
H, NH, HD, FF, V, NL, EPS, BASE = 32, 4, 8, 48, 97, 2, 1e-6, 10000.0
V1_CONFIG = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": H, "num_attention_heads": NH,
             "kv_channels": HD, "intermediate_size": 2 * FF, "vocab_size": V, "num_hidden_layers": NL,
             "rotary_emb_base": BASE, "rotary_pct": 1.0, "seq_length": 64, "max_position_embeddings": 64,
             "layer_norm_epsilon": EPS, "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True}


def v1_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Qwen v1 names and shapes written out literally (not through our key map)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    w = {"transformer.wte.weight": r(V, H, scale=1.0), "transformer.ln_f.weight": 1 + r(H), "lm_head.weight": r(V, H)}
    for i in range(NL):
        p = f"transformer.h.{i}."
        w |= {p + "ln_1.weight": 1 + r(H), p + "attn.c_attn.weight": r(3 * H, H), p + "attn.c_attn.bias": r(3 * H),
              p + "attn.c_proj.weight": r(H, H), p + "ln_2.weight": 1 + r(H), p + "mlp.w1.weight": r(FF, H),
              p + "mlp.w2.weight": r(FF, H), p + "mlp.c_proj.weight": r(H, FF)}
    return w


def v1_reference_logits(w: dict[str, torch.Tensor], ids_L: torch.Tensor) -> torch.Tensor:
    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS) * weight

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
        return torch.cat([-x2, x1], dim=-1)

    L = ids_L.shape[0]
    inv = 1.0 / BASE ** (torch.arange(0, HD, 2).float() / HD)
    freqs = torch.outer(torch.arange(L).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, HD]
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [L, 1, HD]
    x = w["transformer.wte.weight"][ids_L]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for i in range(NL):
        p = f"transformer.h.{i}."
        qkv = rms(x, w[p + "ln_1.weight"]) @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(L, NH, HD) for t in qkv.split(H, dim=-1))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(L, H) @ w[p + "attn.c_proj.weight"].T
        y = rms(x, w[p + "ln_2.weight"])
        x = x + ((y @ w[p + "mlp.w1.weight"].T) * F.silu(y @ w[p + "mlp.w2.weight"].T)) @ w[p + "mlp.c_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


def write_v1_dir(d: Path, w: dict[str, torch.Tensor], fmt: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(V1_CONFIG))
    keys = sorted(w)
    halves = {"a": keys[: len(keys) // 2], "b": keys[len(keys) // 2:]}
    weight_map = {}
    for tag, ks in halves.items():
        name = f"model-{tag}.safetensors" if fmt == "safetensors" else f"pytorch_model-{tag}.bin"
        part = {k: w[k].contiguous() for k in ks}
        save_file(part, str(d / name)) if fmt == "safetensors" else torch.save(part, d / name)
        weight_map |= {k: name for k in ks}
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (d / index).write_text(json.dumps({"weight_map": weight_map}))
    return d


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_qwen_v1_through_key_map_matches_reference(tmp_path: Path, fmt: str) -> None:
    w = v1_weights()
    d = write_v1_dir(tmp_path / "qwen", w, fmt)
    hf = llm_hf_config(LLMConfig(path=str(d), attn_implementation="eager"))
    assert (type(hf).__name__, hf.intermediate_size, hf.num_key_value_heads) == ("Qwen2Config", FF, NH)
    assert hf.rope_parameters["rope_theta"] == BASE and hf.rms_norm_eps == EPS and not hf.tie_word_embeddings
    model = build_llm(hf).eval()
    want = {"llm_model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors, report = read_llm(d, want)
    assert report.ok and not report.ignored and len(report.loaded) == len(want)
    copy_into(model, tensors, lambda k: k[len("llm_model."):])
    ids = torch.tensor([5, 17, 3, 96, 42, 0, 11, 7, 64, 20])
    with torch.no_grad():
        got = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(got, v1_reference_logits(w, ids), atol=2e-5, rtol=2e-5)
    # the inverse map (for converters) gives back the file exactly
    back = to_qwen_v1_names({k: v for k, v in tensors.items()})
    assert set(back) == {"llm_model." + k for k in w}
    for k, v in w.items():
        assert torch.equal(back["llm_model." + k], v)


def test_full_size_qwen_v1_shapes_match_formats_md() -> None:
    s7 = llm_file_shapes(llm_config_json("qwen7b_chat", num_layers=1))
    assert s7["transformer.wte.weight"] == (151936, 4096) and s7["lm_head.weight"] == (151936, 4096)
    assert s7["transformer.h.0.attn.c_attn.weight"] == (12288, 4096) and s7["transformer.h.0.attn.c_attn.bias"] == (
        12288,)
    assert s7["transformer.h.0.mlp.w1.weight"] == s7["transformer.h.0.mlp.w2.weight"] == (11008, 4096)
    assert s7["transformer.h.0.mlp.c_proj.weight"] == (4096, 11008)
    s14 = llm_file_shapes(llm_config_json("qwen14b_chat", num_layers=1))
    assert s14["transformer.wte.weight"] == (152064, 5120) and s14["transformer.h.0.attn.c_attn.weight"] == (15360,
                                                                                                             5120)
    assert s14["transformer.h.0.mlp.w1.weight"] == (13696, 5120)
    assert len(s7) == 3 + 8 * 1


def test_first_release_qwen_config_layout(tmp_path: Path) -> None:
    old = {"model_type": "qwen", "n_embd": H, "n_head": NH, "n_layer": NL, "ffn_hidden_size": 2 * FF,
           "padded_vocab_size": V, "vocab_size": V, "kv_channels": HD, "seq_length": 2048, "layer_norm_epsilon": 1e-5,
           "rotary_emb_base": BASE, "rotary_pct": 1.0, "n_positions": 6144}
    (tmp_path / "config.json").write_text(json.dumps(old))
    hf = llm_hf_config(LLMConfig(path=str(tmp_path)))
    assert (hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size, hf.rms_norm_eps,
            hf.max_position_embeddings) == (H, NL, FF, 1e-5, 2048)


# --- predecessors' checkpoints ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen7b(tmp_path_factory: pytest.TempPathFactory):
    """The qwen7b_chat preset with tiny synthetic files (2 LLM layers, 1 ViT block) and its config."""
    root = tmp_path_factory.mktemp("w")
    files = write_preset("qwen7b_chat", root, num_layers=2, vision_depth=1, tiny=True)
    opts = [*TINY_OPTIONS, "model.vision.depth=1"] + [
        f"model.{k}={root / v}" for k, v in (("vision.checkpoint", "cache/ckpt/eva/eva_vit_g.pth"),
                                             ("qformer.checkpoint", "cache/ckpt/blip2/blip2_pretrained_flant5xxl.pth"),
                                             ("llm.path", "cache/ckpt/Qwen7B-chat"),
                                             ("llm.tokenizer", "cache/ckpt/Qwen7B-chat"))]
    return load_config(preset_path("qwen7b_chat"), opts), files, root


def test_mpp_sft_7b_mangled_names_land_on_norm_and_head(tiny_qwen7b) -> None:
    cfg, files, _ = tiny_qwen7b
    want = model_shapes(cfg.model)
    sd = torch.load(files["mpp_sft"], weights_only=True)
    assert "llm_model.transformer.final_h.2norm.weight" in sd and "llm_model.transformer.lm_head.weight" in sd
    got, rep = read_checkpoint(files["mpp_sft"], want, num_layers=2)
    assert rep.ok and not rep.ignored
    assert torch.equal(got["llm_model.model.norm.weight"], sd["llm_model.transformer.final_h.2norm.weight"])
    assert torch.equal(got["llm_model.lm_head.weight"], sd["llm_model.transformer.lm_head.weight"])
    c = sd["llm_model.transformer.h.1.attn.c_attn.weight"]
    n = c.shape[0] // 3
    assert torch.equal(got["llm_model.model.layers.1.self_attn.k_proj.weight"], c[n:2 * n])
    w2 = sd["llm_model.transformer.h.1.mlp.w2.weight"]
    assert torch.equal(got["llm_model.model.layers.1.mlp.gate_proj.weight"], w2)
    # every file key is accounted for: 3 c_attn tensors fan out to 3 each
    assert len(rep.loaded) == len(sd) + 2 * 2 * 2


def test_predecessor_formats_every_key_accounted(tiny_qwen7b, tmp_path: Path) -> None:
    cfg, files, _ = tiny_qwen7b
    want = model_shapes(cfg.model)
    hidden, qh = want["llm_proj.weight"]
    # MPP pretrain model.pth
    got, rep = read_checkpoint(files["mpp_pretrain"], want, num_layers=2)
    assert rep.ok and sorted(got) == ["llm_proj.bias", "llm_proj.weight"]
    # MPP SFT with 14B-style (correct) names
    raw = llm_config_json("qwen7b_chat", 2, tiny=True)
    p14 = write_mpp_sft(tmp_path / "sft14.pth", raw, mangled_7b=False, qformer_hidden=qh)
    got, rep = read_checkpoint(p14, want, num_layers=2)
    assert rep.ok and not rep.ignored and "llm_model.model.norm.weight" in got and "llm_model.lm_head.weight" in got
    # MiniGPT-4 as its saver writes it: {"model": {llama_proj.*, buffers}, "optimizer", "config", "scaler", "epoch"}
    p = write_minigpt4(tmp_path / "prerained_minigpt4_7b.pth", hidden, qh)
    got, rep = read_checkpoint(p, want, num_layers=2)
    assert rep.ok and sorted(got) == ["llm_proj.bias", "llm_proj.weight"]
    assert list(rep.ignored) == ["Qformer.bert.embeddings.position_ids"]
    assert any("other top-level entries not read: config, epoch, optimizer, scaler" in n for n in rep.notes)
    # our own converter output: plain-model names
    model = MultimodalLM(cfg.model, 0)
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(("llm_proj.", "llm_model."))}
    torch.save(ours, tmp_path / "ours.pth")
    got, rep = read_checkpoint(tmp_path / "ours.pth", want, num_layers=2)
    assert rep.ok and set(got) == set(ours) and len(rep.loaded) == len(ours)
    # an unknown key is unexpected, never dropped; a 14B-width projection is a shape mismatch with a hint
    torch.save({"llm_proj.weight": torch.zeros(5120, qh), "bogus.weight": torch.zeros(2)}, tmp_path / "bad.pth")
    _, rep = read_checkpoint(tmp_path / "bad.pth", want, num_layers=2)
    assert rep.unexpected == ["bogus.weight"] and [m.key for m in rep.mismatched] == ["llm_proj.weight"]
    assert f"file [5120, {qh}] vs model [{hidden}, {qh}]" in rep.format() and "14B" in rep.format()


# --- per-stage loading -----------------------------------------------------------------------------------------------


def test_two_stage_ranks_read_only_their_tensors_and_chain_equals_plain(tiny_qwen7b, monkeypatch) -> None:
    cfg, files, _ = tiny_qwen7b
    cfg = replace(cfg, model=replace(cfg.model, checkpoint=str(files["mpp_pretrain"])))
    read: list[str] = []
    real_open = llm_weights._open_safetensors

    class Logged:
        def __init__(self, path: Path) -> None:
            self.f = real_open(path)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *a: object) -> None:
            self.f.__exit__(*a)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, k: str):
            read.append(k)
            return self.inner.get_slice(k)

        def get_tensor(self, k: str) -> torch.Tensor:
            read.append(k)
            return self.inner.get_tensor(k)

    monkeypatch.setattr(llm_weights, "_open_safetensors", Logged)
    hf = llm_hf_config(cfg.model.llm)
    tok_id = 151646
    specs = layer_specs(cfg.model, hf, decoder_parts(hf), tok_id)
    table = layer_table(hf.num_hidden_layers)
    parts = [0, 2, len(specs)]  # stage 0: embed + block 0; stage 1: block 1, norm, head
    stages, reads = [], []
    for s in range(2):
        layers = {i: specs[i].build() for i in range(parts[s], parts[s + 1])}
        read.clear()
        reports = load_layer_weights(cfg.model, layers, table)
        reads.append({k for k in read})
        stages.append((layers, reports))
    v1 = {"transformer.wte.weight", *(f"transformer.h.0.{n}" for n in (
        "ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "ln_2.weight", "mlp.w1.weight",
        "mlp.w2.weight", "mlp.c_proj.weight"))}
    assert stages[0][1][2].loaded and all(k.startswith(("llm_model.model.embed_tokens", "llm_model.model.layers.0."))
                                          for k in stages[0][1][2].loaded)
    assert all(k.startswith(("llm_model.model.layers.1.", "llm_model.model.norm", "llm_model.lm_head"))
               for k in stages[1][1][0].loaded)
    assert [r.path.split("/")[-1] for r in stages[1][1]] == ["Qwen7B-chat", "model.pth"]  # no vision file opened
    assert reads[0] == v1  # tensors read from the safetensors shards, by name
    assert reads[1] == {k.replace("h.0", "h.1") for k in v1 - {"transformer.wte.weight"}} | {
        "transformer.ln_f.weight", "lm_head.weight"}
    # chained stages == plain model loaded from the same files
    plain = MultimodalLM(cfg.model, tok_id)
    plain.init_weights(cfg.model.init_seed)
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    tensors, reports = load_weights(cfg.model, want)
    assert all(r.ok for r in reports)
    copy_into(plain, tensors, lambda k: k)
    plain.eval()
    ids = torch.tensor([[151644, 872, 198] + [tok_id] * 32 + [3838, 374, 151645]])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = plain(pixels, ids, torch.ones_like(ids))
        x = (pixels, ids, torch.ones_like(ids))
        for layers, _ in stages:
            for i in sorted(layers):
                x = layers[i].eval()(x)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


# --- every preset at full width, on shapes alone ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LLM_CONFIGS))
def test_preset_full_width_layout_loads_with_nothing_missing(name: str, tmp_path: Path) -> None:
    assert name in model_types()
    raw = llm_config_json(name, num_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(preset_path(name), [f"model.llm.path={tmp_path}"])
    want = model_shapes(cfg.model)  # full widths (1408 / 768 / 4096-5120), meta device
    _, rv = plan_eva_vit(eva_vit_file_shapes(cfg.model.vision, extra_block=True), cfg.model.vision, want)
    files = LLMFiles(tmp_path, raw["model_type"] == "qwen", shapes=llm_file_shapes(raw))
    _, rl = plan_llm(files, want)
    reports = [rv, rl]
    if cfg.model.qformer.checkpoint:  # not for MiniGPT-4's LLaMA-2 model (no Q-Former)
        reports.append(plan_blip2(blip2_file_shapes(cfg.model), cfg.model, want)[1])
    for rep in reports:
        assert rep.ok and not rep.missing and not rep.unexpected, rep.format()
    provided = {k for rep in reports for k in rep.loaded}
    # llm_proj from -c / training; without a Q-Former ln_vision keeps its default init as in MiniGPT-4
    assert set(want) - provided == {"llm_proj.weight", "llm_proj.bias", *default_init_keys(cfg.model)}


def test_14b_llm_under_7b_preset_names_key_shapes_and_cause(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llm_config_json("qwen7b_chat", num_layers=2)))
    cfg = load_config(preset_path("qwen7b_chat"), [f"model.llm.path={tmp_path}"])
    files = LLMFiles(tmp_path, True, shapes=llm_file_shapes(llm_config_json("qwen14b_chat", num_layers=2)))
    _, rep = plan_llm(files, model_shapes(cfg.model))
    text = rep.format()
    assert not rep.ok and "llm_model.model.embed_tokens.weight: file [152064, 5120] vs model [151936, 4096]" in text
    assert "llm_model.model.layers.0.self_attn.q_proj.weight: file [5120, 5120] vs model [4096, 4096]" in text
    assert "14B checkpoint on a 7B config" in text


def test_mpp_pretrain_full_width(tmp_path: Path) -> None:
    p = write_mpp_pretrain(tmp_path / "model.pth", 4096)
    raw = llm_config_json("qwen7b_chat", num_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(preset_path("qwen7b_chat"), [f"model.llm.path={tmp_path}"])
    got, rep = read_checkpoint(p, model_shapes(cfg.model), num_layers=1)
    assert rep.ok and got["llm_proj.weight"].shape == (4096, 768)


# --- tokenizer families: image placeholders that keep the vocabulary -------------------------------------------------


def test_llama_sentencepiece_placeholder_is_unk_and_never_from_text(tmp_path: Path) -> None:
    from lavis.data.conversation import SYSTEM_PROMPTS, ChatTemplate, encode_prompt
    from lavis.data.tokenizer import LLAMA_IMAGE_PLACEHOLDER, SentencePieceTokenizer, load_tokenizer
    from lavis.testing.synthetic import write_sentencepiece

    write_sentencepiece(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.token_id("<unk>"), tok.token_id("<s>"), tok.token_id("</s>")) == (0, 1, 2)
    assert LLAMA_IMAGE_PLACEHOLDER == "<unk>"
    for text in ["A red circle.", "你好，世界! café ✓ \u00ff\x01", "<Img></Img> ###Human: x"]:
        ids = tok.encode(text)
        assert 0 not in ids and 1 not in ids and 2 not in ids  # byte fallback: no <unk> from text
        assert tok.decode(ids) == text
    assert tok.encode("<s>a</s>") == [1, *tok.encode("a"), 2]
    tpl = ChatTemplate(tok, SYSTEM_PROMPTS["vicuna_v0"], "<unk>", 32, 4, name="vicuna_v0")
    ids = encode_prompt([("<image>What is in the image?", None)], tpl)
    assert ids.count(0) == 32 and tpl.placeholder_id == 0
    run = ids.index(0)
    assert ids[run:run + 32] == [0] * 32


def test_qwen25_tokenizer_json_placeholder(tmp_path: Path) -> None:
    from lavis.data.tokenizer import TextTokenizer, load_tokenizer
    from lavis.testing.synthetic import write_bpe_tokenizer_json

    write_bpe_tokenizer_json(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, TextTokenizer) and tok.is_special("<|image_pad|>")
    pad = tok.token_id("<|image_pad|>")
    assert tok.encode("<|image_pad|>" * 3) == [pad] * 3 and pad not in tok.encode("image pad <|image pad|>")
