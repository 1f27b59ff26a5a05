"""Synthetic weight files for a ``--model-type`` preset: real key names, real widths, fewer layers, random values.

No real weights can be downloaded here, so ``lavis.inspect`` and the tests run on these. For a preset this writes,
under ``ROOT`` in the predecessors' ``cache/ckpt/`` layout (WEIGHT.md): ``eva/eva_vit_g.pth`` (with the 40th block),
``blip2/blip2_pretrained_flant5xxl.pth`` (presets with a Q-Former), the LLM directory (``config.json`` with the real
dimensions and ``num_hidden_layers`` reduced, weights in two shards with an index, the family's tokenizer file) and the
predecessors' checkpoints for that family under ``predecessors/``.

    python -m lavis.testing.synthetic --model-type qwen7b_chat --root /tmp/w --num-layers 2 --vision-depth 2
    cd /tmp/w && python -m lavis.inspect --model-type qwen7b_chat --options model.vision.depth=2 --forward

Tokenizer files are synthetic too except ``qwen.tiktoken``, which is copied from ``../shared/data`` when present
(a generated stand-in with the same 151,643 ranks otherwise): a small SentencePiece model (LLaMA's special ids
0/1/2, byte fallback) and a small byte-level BPE ``tokenizer.json`` with Qwen2.5's special tokens.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from lavis.config.load import load_config
from lavis.config.presets import model_types, preset_path
from lavis.config.schema import ModelConfig
from lavis.data import shapes
from lavis.data.tokenizer import QWEN_NUM_REGULAR
from lavis.model.llm import is_qwen_v1, qwen_v1_to_qwen2_config, to_qwen_v1_names
from lavis.model.published import PUBLISHED_LLM_CONFIGS
from lavis.testing.synthetic_vision import (
    blip2_file_shapes,
    eva_vit_file_shapes,
    random_tensor,
    write_synthetic_blip2,
    write_synthetic_eva_vit,
)

Shape = tuple[int, ...]
REPO = Path(__file__).resolve().parents[2]
SHARED_TIKTOKEN = REPO.parent / "shared" / "data" / "qwen.tiktoken"

LLM_CONFIGS = PUBLISHED_LLM_CONFIGS
"""The LLM directory's ``config.json`` for each preset (real dimensions)."""

TINY_LLM = {"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "num_key_value_heads": 4}
TINY_OPTIONS = ["model.vision.width=64", "model.vision.num_heads=4", "model.vision.mlp_hidden=128",
                "model.vision.patch_size=14", "model.qformer.hidden_size=64", "model.qformer.num_heads=4",
                "model.qformer.intermediate_size=128", "model.qformer.num_layers=2"]
"""``--tiny``: reduced widths for a fast real forward (vocabulary kept so the real tokenizer ids fit); pass the same
``--options`` to ``lavis.inspect``."""


def llm_config_json(model_type: str, num_layers: int | None = None, tiny: bool = False) -> dict[str, Any]:
    if model_type not in LLM_CONFIGS:
        raise ValueError(f"no synthetic LLM layout for {model_type!r}; known: {', '.join(LLM_CONFIGS)}")
    raw = copy.deepcopy(LLM_CONFIGS[model_type])
    if num_layers is not None:
        raw["num_hidden_layers"] = num_layers
    if tiny:
        for k, v in TINY_LLM.items():
            if k in raw or k == "num_key_value_heads" and raw["model_type"] != "qwen":
                raw[k] = v
        if raw["model_type"] in ("qwen2", "qwen3"):
            raw["num_key_value_heads"] = 2
        if "head_dim" in raw:
            raw["head_dim"] = TINY_LLM["hidden_size"] // TINY_LLM["num_attention_heads"]
        raw["intermediate_size"] = 256 if raw["model_type"] == "qwen" else 128
    return raw


def llm_file_shapes(raw: dict[str, Any]) -> dict[str, Shape]:
    """Tensor name -> shape of the LLM directory's weights for ``raw`` (Qwen v1 names for ``model_type: qwen``),
    computed on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_qwen_v1(raw):
        hf = qwen_v1_to_qwen2_config(raw)
    else:
        fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
        hf = AutoConfig.for_model(raw["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    state = model.state_dict()
    if is_qwen_v1(raw):
        state = to_qwen_v1_names(state, prefix="")
    return {k: tuple(v.shape) for k, v in state.items()}


def _shards(keys: list[str], n: int) -> list[list[str]]:
    per = -(-len(keys) // n)
    return [keys[i:i + per] for i in range(0, len(keys), per)]


def write_llm_dir(
    directory: str | Path, raw: dict[str, Any], *, fmt: str = "safetensors", num_shards: int = 2,
    dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> dict[str, Shape]:
    """``config.json`` + sharded weights (``safetensors`` or ``bin``) with an index; returns name -> shape."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(raw, indent=2))
    shapes = llm_file_shapes(raw)
    gen = torch.Generator().manual_seed(seed)
    groups = _shards(list(shapes), num_shards)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups):
        tensors = {k: random_tensor(k, shapes[k], dtype, gen).contiguous() for k in keys}
        if fmt == "safetensors":
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            from safetensors.torch import save_file

            save_file(tensors, str(d / name), metadata={"format": "pt"})
        elif fmt == "bin":
            name = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
            torch.save(tensors, d / name)
        else:
            raise ValueError(f"fmt must be safetensors or bin, not {fmt!r}")
        weight_map |= {k: name for k in keys}
        del tensors
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return shapes


# --- tokenizer files ------------------------------------------------------------------------------------------------


def write_qwen_tiktoken(path: str | Path) -> Path:
    """The real ``qwen.tiktoken`` when ``../shared/data`` has it; else 151,643 generated ranks (bytes, then byte
    pairs, then printable triples), which ``QwenTokenizer`` accepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if SHARED_TIKTOKEN.is_file():
        shutil.copy2(SHARED_TIKTOKEN, path)
        return path
    toks: list[bytes] = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    printable = range(32, 127)
    for a in printable:
        for b in printable:
            for c in printable:
                if len(toks) >= QWEN_NUM_REGULAR:
                    break
                toks.append(bytes([a, b, c]))
    lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(toks[:QWEN_NUM_REGULAR])]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sentencepiece(directory: str | Path) -> Path:
    """A small LLaMA-style SentencePiece model: ``<unk>``=0, ``<s>``=1, ``</s>``=2, byte fallback, no normalisation."""
    import io

    import sentencepiece as spm

    corpus = shapes.corpus() + ["Describe this image in detail.", "What is in the image?", "###Human: ###Assistant:"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 4), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,  # as LLaMA
    )
    path = Path(directory) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


QWEN25_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|vision_start|>",
                   "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN3_SPECIALS = (*QWEN25_SPECIALS, "<think>", "</think>")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")
BPE_SPECIALS = {"qwen2.5_7b_instruct": QWEN25_SPECIALS, "qwen3_8b": QWEN3_SPECIALS,
                "llama3.1_8b_instruct": LLAMA3_SPECIALS}
"""Special tokens of each ``tokenizer.json`` family (names only; the synthetic ids are small)."""


def write_bpe_tokenizer_json(directory: str | Path, specials: tuple[str, ...] = QWEN25_SPECIALS) -> Path:
    """A small byte-level BPE ``tokenizer.json`` carrying a family's chat and vision special tokens (Qwen2.5's by
    default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(shapes.corpus() + ["You are Qwen, created by Alibaba Cloud."], trainer)
    path = Path(directory) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


# --- predecessors' checkpoints --------------------------------------------------------------------------------------


def write_mpp_pretrain(path: str | Path, llm_hidden: int, qformer_hidden: int = 768, seed: int = 0) -> Path:
    """MPP-Qwen ``pipe_proj2pth.py`` output: a plain bf16 dict ``{llm_proj.weight, llm_proj.bias}``."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: random_tensor(k, s, torch.bfloat16, gen) for k, s in
             {"llm_proj.weight": (llm_hidden, qformer_hidden), "llm_proj.bias": (llm_hidden,)}.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return Path(path)


def write_mpp_sft(path: str | Path, raw: dict[str, Any], *, mangled_7b: bool, qformer_hidden: int = 768,
                  seed: int = 0) -> Path:
    """MPP-Qwen ``pipemodel2pth.py`` output: ``llm_proj.*`` + ``llm_model.transformer.*`` (Qwen v1 names) +
    ``llm_model.lm_head.weight``; with ``mangled_7b`` the final norm and head carry the names its 14B-only indices
    give a 7B model (``llm_model.transformer.final_h.{L}norm.weight``, ``llm_model.transformer.lm_head.weight``)."""
    shapes = llm_file_shapes(raw)
    gen = torch.Generator().manual_seed(seed)
    hidden = int(raw.get("hidden_size") or raw["n_embd"])
    state = {k: random_tensor(k, s, torch.bfloat16, gen) for k, s in
             {"llm_proj.weight": (hidden, qformer_hidden), "llm_proj.bias": (hidden,)}.items()}
    n = int(raw.get("num_hidden_layers") or raw["n_layer"])
    for k, s in shapes.items():
        name = "llm_model." + k
        if mangled_7b and k == "transformer.ln_f.weight":
            name = f"llm_model.transformer.final_h.{n}norm.weight"
        elif mangled_7b and k == "lm_head.weight":
            name = "llm_model.transformer.lm_head.weight"
        state[name] = random_tensor(k, s, torch.bfloat16, gen)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return Path(path)


def write_minigpt4(path: str | Path, llm_hidden: int, qformer_hidden: int = 768, seed: int = 0,
                   num_layers: int = 0, head_dim: int = 128, has_qformer: bool = True) -> Path:
    """MiniGPT-4 checkpoint as its LAVIS-style ``_save_checkpoint`` writes it: ``{"model", "optimizer", "config",
    "scaler", "epoch"}``. ``model`` is the state dict minus frozen parameters, buffers kept: ``llama_proj.*`` (the
    only trained weight), ``Qformer.bert.embeddings.position_ids`` (with a Q-Former) and, for each of ``num_layers``
    LLaMA blocks, ``llama_model.model.layers.N.self_attn.rotary_emb.inv_freq`` (a persistent buffer in the
    transformers 4.30 it pins). ``qformer_hidden`` is ``llama_proj``'s input width (768; without a Q-Former, the
    LLaMA-2 model's ``has_qformer: False``, 4 x 1408 = 5632). ``optimizer`` is AdamW's state for the two trained
    tensors; ``config`` the run config as plain dicts."""
    gen = torch.Generator().manual_seed(seed)
    model = {k: random_tensor(k, s, torch.float32, gen) for k, s in
             {"llama_proj.weight": (llm_hidden, qformer_hidden), "llama_proj.bias": (llm_hidden,)}.items()}
    if has_qformer:
        model["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(num_layers):
        model[f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    optimizer = {
        "state": {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
                  for i, t in enumerate((model["llama_proj.weight"], model["llama_proj.bias"]))},
        "param_groups": [{"lr": 3e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd, "amsgrad": False,
                          "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                          "fused": None, "params": [i]} for i, wd in ((0, 0.05), (1, 0.0))],
    }
    variant = {"model_type": "pretrain_vicuna0", "end_sym": "###"} if has_qformer else {
        "model_type": "pretrain_llama2", "end_sym": "</s>", "has_qformer": False}
    config = {"model": {"arch": "minigpt4", "max_txt_len": 160, **variant},
              "run": {"task": "image_text_pretrain", "init_lr": 3e-5, "max_epoch": 5, "amp": True},
              "datasets": {"cc_sbu_align": {"batch_size": 12}}}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 13}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "optimizer": optimizer, "config": config, "scaler": scaler, "epoch": 4}, path)
    return Path(path)


def write_mpp_pipeline_dir(
    run_dir: str | Path, cfg: ModelConfig, raw: dict[str, Any], *, pretrain: bool, step: int = 2181,
    inv_freq: bool = True, seed: int = 0,
) -> Path:
    """An MPP-Qwen-Next run directory as its ``train_pipeline.py`` leaves it (``lavis.predecessors.mpp_layers`` has the
    layer table): ``latest`` and ``global_step{step}/layer_XX-model_states.pt`` for every pipeline layer (bf16, frozen
    weights included, ``{}`` for parameterless layers; ``occupy.weight`` in pretrain), ``mp_rank_00_model_states.pt``
    with ``module: None``. ``inv_freq``: the rotary buffer older Qwen remote code saved in layer 0."""
    gen = torch.Generator().manual_seed(seed)
    tag = Path(run_dir) / f"global_step{step}"
    tag.mkdir(parents=True, exist_ok=True)
    llm = llm_file_shapes(raw)
    hidden = int(raw.get("hidden_size") or raw["n_embd"])
    n = int(raw.get("num_hidden_layers") or raw["n_layer"])

    def fill(shapes: dict[str, Shape]) -> dict[str, torch.Tensor]:
        return {k: (torch.arange(s[-1]).expand(s).clone() if k.endswith("position_ids")
                    else random_tensor(k, s, torch.bfloat16, gen)) for k, s in shapes.items()}

    vit = eva_vit_file_shapes(cfg.vision, extra_block=False)
    layer0 = {"visionpipe.visual_encoder." + k: s for k, s in vit.items()}
    layer0 |= {"visionpipe." + k: s for k, s in blip2_file_shapes(cfg, t5_proj=False).items()}
    layer0 |= {"visionpipe.llm_proj.weight": (hidden, cfg.qformer.hidden_size), "visionpipe.llm_proj.bias": (hidden,),
               "wtepipe.word_embeddings.weight": llm["transformer.wte.weight"]}
    layers: list[dict[str, torch.Tensor]] = [fill(layer0)]
    if inv_freq:
        head_dim = hidden // int(raw.get("num_attention_heads") or raw["n_head"])
        layers[0]["rotary_emb.inv_freq"] = torch.rand(head_dim // 2, generator=gen)
    layers += [{} for _ in range(4)]
    for j in range(n):
        p = f"transformer.h.{j}."
        layers.append(fill({"layer." + k[len(p):]: s for k, s in llm.items() if k.startswith(p)}))
    layers.append(fill({"final_layernorm.weight": llm["transformer.ln_f.weight"]}))
    layers.append(fill({"lm_head.weight": llm["lm_head.weight"]}))
    layers.append({})
    if pretrain:
        layers.append({"occupy.weight": torch.zeros(1000, 1000, dtype=torch.bfloat16)})
    for i, state in enumerate(layers):
        torch.save(state, tag / f"layer_{i:02d}-model_states.pt")
    torch.save({"module": None, "global_steps": step, "dp_world_size": 1, "mp_world_size": 1},
               tag / "mp_rank_00_model_states.pt")
    (Path(run_dir) / "latest").write_text(tag.name)
    return tag


MINIGPT4_CHECKPOINTS = {"vicuna0_7b": "prerained_minigpt4_7b.pth", "vicuna0_13b": "pretrained_minigpt4.pth",
                        "minigpt4_llama2": "pretrained_minigpt4_llama2_7b.pth"}
"""MiniGPT-4's released checkpoint file name per preset (its README's links; the 7B Vicuna name is misspelt there)."""


# --- a whole preset -------------------------------------------------------------------------------------------------


def write_preset(
    model_type: str, root: str | Path, *, num_layers: int = 2, vision_depth: int = 2, tiny: bool = False,
    options: list[str] | None = None, llm_format: str = "safetensors",
) -> dict[str, Path]:
    """Every file ``model_type`` names, under ``root`` (the directory ``lavis.inspect`` then runs in)."""
    from dataclasses import replace

    root = Path(root)
    opts = list(options or []) + (TINY_OPTIONS if tiny else []) + [f"model.vision.depth={vision_depth}"]
    cfg: ModelConfig = load_config(preset_path(model_type), opts).model
    raw = llm_config_json(model_type, num_layers, tiny)
    out: dict[str, Path] = {}
    assert cfg.vision.checkpoint is not None and cfg.llm.path is not None, f"{model_type}: a preset names its files"
    vpath = root / cfg.vision.checkpoint
    write_synthetic_eva_vit(vpath, cfg.vision, extra_block=True)
    out["eva"] = vpath
    if cfg.qformer.checkpoint is not None:
        qpath = root / cfg.qformer.checkpoint
        write_synthetic_blip2(qpath, replace(cfg, vision=cfg.vision))
        out["blip2"] = qpath
    llm_dir = root / cfg.llm.path
    write_llm_dir(llm_dir, raw, fmt=llm_format)
    out["llm"] = llm_dir
    hidden = int(raw["hidden_size"])
    qh = cfg.projection_in_dim
    pred = root / "cache/ckpt/predecessors" / model_type
    if raw["model_type"] == "qwen":
        write_qwen_tiktoken(llm_dir / "qwen.tiktoken")
        out["mpp_pretrain"] = write_mpp_pretrain(pred / "model.pth", hidden, qh)
        out["mpp_sft"] = write_mpp_sft(pred / "unfreeze_llm_model.pth", raw, qformer_hidden=qh,
                                       mangled_7b=model_type == "qwen7b_chat")
    elif model_type in BPE_SPECIALS:
        write_bpe_tokenizer_json(llm_dir, BPE_SPECIALS[model_type])
    elif raw["model_type"] == "llama":
        write_sentencepiece(llm_dir)
        name = MINIGPT4_CHECKPOINTS.get(model_type, "pretrained_minigpt4.pth")
        heads = int(raw["num_attention_heads"])
        out["minigpt4"] = write_minigpt4(pred / name, hidden, qh, num_layers=int(raw["num_hidden_layers"]),
                                         head_dim=hidden // heads, has_qformer=cfg.qformer.enabled)
    else:
        write_bpe_tokenizer_json(llm_dir)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lavis.testing.synthetic", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model-type", required=True, help=", ".join(model_types()))
    ap.add_argument("--root", required=True, help="directory to write cache/ckpt/... under (run inspect there)")
    ap.add_argument("--num-layers", type=int, default=2, help="LLM decoder blocks (real: 28-40)")
    ap.add_argument("--vision-depth", type=int, default=2, help="ViT blocks (real: 39; one extra block is written)")
    ap.add_argument("--tiny", action="store_true", help="reduced widths too (see TINY_OPTIONS)")
    ap.add_argument("--llm-format", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--options", nargs="*", default=[], help="config overrides, as for lavis.inspect")
    a = ap.parse_args(argv)
    files = write_preset(a.model_type, a.root, num_layers=a.num_layers, vision_depth=a.vision_depth, tiny=a.tiny,
                         options=a.options, llm_format=a.llm_format)
    for k, p in files.items():
        print(f"{k}: {p}")
    opts = [*a.options, *(TINY_OPTIONS if a.tiny else []), f"model.vision.depth={a.vision_depth}"]
    print(f"\ncd {a.root} && {Path(sys.executable).name} -m lavis.inspect --model-type {a.model_type} --forward "
          f"--options {' '.join(opts)}")


if __name__ == "__main__":
    main()
