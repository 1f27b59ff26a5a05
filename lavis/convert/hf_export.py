"""``--hf-out DIR``: the trained LLM as a transformers directory, with the projector and vision config beside it.

``DIR`` after export::

    config.json, model.safetensors (or shards), generation_config.json   AutoModelForCausalLM.from_pretrained(DIR)
    <tokenizer file>        the run's tokenizer (tokenizer.json / qwen.tiktoken / tokenizer.model), copied as is
    projector.pth           {llm_proj.*}: Q-Former outputs -> LLM embeddings
    mm_config.yaml          the run's full config (vision, Q-Former, projection, template, placeholder)

The LLM's weights are the model the ``.pth`` describes: trained weights from the checkpoint on top of the base weights
the config names (or the seeded init when it names none), built through the same loader chat uses. The LLM is
always written in transformers' native classes (Qwen v1 checkpoints become Qwen2-architecture directories).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lavis.config.load import from_dict, save_config
from lavis.config.schema import Config
from lavis.data.tokenizer import load_tokenizer
from lavis.engine.checkpoint import META_FILE, load_meta
from lavis.model.spec import ModelSpec
from lavis.weights.load import load_model

if TYPE_CHECKING:
    from lavis.model.mllm import MultimodalLM


def export_hf(tag_dir: Path, pth: Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
              spec: ModelSpec | None = None) -> Path:
    meta = load_meta(tag_dir)
    cfg = from_dict(Config, meta["config"], source=str(tag_dir / META_FILE))
    tok_file = tag_dir / meta["tokenizer"]
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} missing: the checkpoint directory lacks the run's tokenizer")
    tok = load_tokenizer(str(tok_file))
    model = load_model(cfg, pth, tok, torch.device("cpu"), dtype, spec)  # spec: the converter's (one per process)
    return write_hf_dir(model, cfg, tok_file, out_dir)


def write_hf_dir(model: MultimodalLM, cfg: Config, tok_file: Path, out_dir: str | Path) -> Path:
    """The layout above from a loaded plain model (its ``llm_model`` has no adapter layers)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.llm_model.save_pretrained(out, safe_serialization=True)
    write_sidecar(model, cfg, tok_file, out)
    return out


def write_sidecar(model: MultimodalLM, cfg: Config, tok_file: Path, out: Path) -> None:
    """The tokenizer, ``projector.pth`` and ``mm_config.yaml`` beside an exported LLM (or adapter) directory."""
    shutil.copy2(tok_file, out / tok_file.name)
    proj = {f"llm_proj.{k}": v.detach().clone() for k, v in model.llm_proj.state_dict().items()}
    torch.save(proj, out / "projector.pth")
    save_config(cfg, out / "mm_config.yaml")
