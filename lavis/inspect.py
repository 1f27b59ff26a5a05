"""``python -m lavis.inspect``: account for every weight a config names, optionally run one forward.

    python -m lavis.inspect (--model-type NAME | --cfg-path CFG | --model-dir DIR) [-c CKPT] [--forward]
        [--options k=v ...]

Per file: how many tensors were loaded / missing / unexpected / ignored (and why) / shape-mismatched; a mismatch names
the key, both shapes and the likely cause. Without ``--forward`` nothing is allocated: the model is built on the meta
device and the LLM directory is checked from its headers. ``--forward`` builds the model, loads everything and runs
one forward on a generated image (``lavis.data.shapes``). ``--model-dir`` reads a transformers VLM directory
(Qwen2.5-VL / Qwen3-VL): every tensor of its safetensors against its ``config.json`` (headers only), and with
``--forward`` one forward of transformers' model through its own processor. Exit status 1 on any missing /
unexpected / mismatched key (or a failed forward), 0 otherwise.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lavis.chat.vlm_engine import VLMChatEngine, check_model_dir
from lavis.config.load import load_config
from lavis.config.presets import model_types, preset_path
from lavis.data import shapes
from lavis.data.conversation import encode_prompt, template_from_config
from lavis.data.media import image_transform
from lavis.data.tokenizer import load_tokenizer, resolve_tokenizer_ref
from lavis.model.mllm import MultimodalLM
from lavis.model.spec import ModelSpec
from lavis.pipeline.family import describe
from lavis.vlm.arch import read_hf_config
from lavis.vlm.config import VLMConfig
from lavis.vlm.weights import DirectoryIndex, account
from lavis.vlm.weights import model_shapes as vlm_shapes
from lavis.weights.base import default_init_keys, load_weights, model_shapes, stream_into

if TYPE_CHECKING:
    from lavis.config.schema import Config


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lavis.inspect", description=(__doc__ or "").split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-type", help=f"a shipped model config: {', '.join(model_types())}")
    which.add_argument("--cfg-path", help="a recipe YAML")
    which.add_argument("--model-dir", help="a transformers VLM directory (Qwen2.5-VL / Qwen3-VL)")
    ap.add_argument("-c", "--checkpoint", help="a .pth on top of the base weights (ours or a predecessor's)")
    ap.add_argument("--forward", action="store_true", help="load everything and run one forward on a generated image")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model dtype for --forward")
    ap.add_argument("--options", nargs="*", default=[], help="config overrides key=value")
    return ap.parse_args(argv)


def _forward(cfg: Config, model_spec: ModelSpec, tok: Any, checkpoint: str | None, dtype: torch.dtype) -> bool:
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    try:
        model = MultimodalLM(cfg.model, tok.token_id(cfg.model.llm.image_placeholder), model_spec)
    finally:
        torch.set_default_dtype(torch.float32)
    model.init_weights(cfg.model.init_seed)
    stream_into(cfg.model, model.state_dict(keep_vars=True), checkpoint=checkpoint)
    model.eval()
    spec = shapes.sample_spec(random.Random(0))
    pixels = image_transform("eval", cfg.model.vision.image_size, hflip=False)(shapes.draw(spec)).unsqueeze(0)
    tpl = template_from_config(tok, cfg)
    ids = encode_prompt([("<image>What is in the image?", None)], tpl)
    ids_BL = torch.tensor([ids])
    with torch.no_grad():
        logits = model(pixels.to(dtype), ids_BL, torch.ones_like(ids_BL))
    finite = bool(torch.isfinite(logits).all())
    top = int(logits[0, -1].float().argmax())
    word = repr(tok.decode([top], skip_special_tokens=False)) if top < tok.vocab_size else "(beyond the tokenizer)"
    print(f"forward: image of a {spec.colour} {spec.shape}, {len(ids)} prompt tokens "
          f"({ids.count(tpl.placeholder_id)} image slots) -> logits {list(logits.shape)} {logits.dtype}, "
          f"finite={finite}, next token {top} {word} "
          f"({time.perf_counter() - t0:.1f} s)")
    return finite


def _inspect_vlm_dir(path: str, forward: bool) -> bool:
    directory = check_model_dir(path)
    spec = VLMConfig(path=str(directory))
    hf = read_hf_config(spec)
    text, vision = hf.get_text_config(), hf.vision_config
    print(f"VLM: {hf.model_type}, LLM hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocab "
          f"{text.vocab_size}; vision depth {vision.depth}, hidden {vision.hidden_size}")
    reports = account(DirectoryIndex(str(directory)), vlm_shapes(hf), bool(hf.tie_word_embeddings))
    for rep in reports:
        print(rep.format(limit=20))
    ok = all(r.ok for r in reports)
    if ok and forward:
        ok = _forward_vlm(directory)
    return ok


def _forward_vlm(directory: Path) -> bool:
    t0 = time.perf_counter()
    engine = VLMChatEngine.from_model_dir(directory, device="cpu")
    spec = shapes.sample_spec(random.Random(0))
    with tempfile.TemporaryDirectory(prefix="lavis-inspect-") as tmp:
        image = Path(tmp) / "shape.png"
        shapes.draw(spec).save(image)
        inputs = engine.inputs([engine.make_turn("What is in the image?", [engine.load_media(image)])])
    with torch.no_grad():
        logits = engine.model(**inputs).logits
    finite = bool(torch.isfinite(logits).all())
    top = int(logits[0, -1].argmax())
    visual = int((inputs["input_ids"] == engine.processor.image_token_id).sum())
    print(f"forward: image of a {spec.colour} {spec.shape}, {inputs['input_ids'].shape[1]} prompt tokens ({visual} "
          f"visual, grid {inputs['image_grid_thw'][0].tolist()}) -> logits {list(logits.shape)}, finite={finite}, "
          f"next token {top} {engine.tok.decode([top])!r} ({time.perf_counter() - t0:.1f} s)")
    return finite


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.model_dir:
        if a.checkpoint or a.options:
            raise ValueError("-c and --options belong to --cfg-path / --model-type; a --model-dir directory holds "
                             "its weights and config")
        ok = _inspect_vlm_dir(a.model_dir, a.forward)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    path = preset_path(a.model_type) if a.model_type else a.cfg_path
    cfg = load_config(path, a.options)
    print(f"config: {path}")
    spec = describe(cfg.model)
    hf = spec.hf
    tok = load_tokenizer(resolve_tokenizer_ref(cfg.model.llm.tokenizer, a.cfg_path))
    placeholder = tok.token_id(cfg.model.llm.image_placeholder)
    print(f"LLM: {type(hf).__name__} hidden {hf.hidden_size}, {hf.num_hidden_layers} layers, vocab {hf.vocab_size}; "
          f"tokenizer {tok.source} ({tok.vocab_size} tokens), image placeholder "
          f"{cfg.model.llm.image_placeholder!r} = {placeholder}")
    ok = True
    if placeholder >= hf.vocab_size or tok.vocab_size > hf.vocab_size:
        print(f"ERROR: tokenizer ids reach {max(placeholder, tok.vocab_size - 1)} but the embedding has "
              f"{hf.vocab_size} rows: another model family's tokenizer?")
        ok = False
    want = model_shapes(cfg.model, spec)
    _, reports = load_weights(cfg.model, want, checkpoint=a.checkpoint, read=False)
    if not reports:
        print("no weight file configured: every tensor keeps the seeded random init")
    provided: set[str] = set()
    for rep in reports:
        print(rep.format(limit=20))
        provided |= set(rep.loaded)
        ok &= rep.ok
    by_design = {k: why for k, why in default_init_keys(cfg.model).items() if k in want and k not in provided}
    rest = [k for k in want if k not in provided and k not in by_design]
    groups = sorted({k.split(".")[0] for k in rest})
    print(f"model: {len(want)} tensors, {len(provided)} from files, "
          + (f"{len(by_design)} at their default init by design ({next(iter(by_design.values()))}), "
             if by_design else "")
          + f"{len(rest)} keep the seeded init" + (f" ({', '.join(groups)})" if rest else ""))
    if ok and a.forward:
        ok = _forward(cfg, spec, tok, a.checkpoint, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    from lavis.cli import run_cli

    run_cli(main)
