"""The VLM data side assembled for the trainer: the processor, the dataset and the collator of a run.

The VLM family's ``training_data`` (``lavis.vlm.family``, which the trainer's ``build_data`` asks) is
:func:`build_vlm_data`, where the BLIP-2-style family's is ``ConversationDataset`` / ``Collator``; the sampler and
``StepLoader`` are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavis.config.schema import DataConfig
from lavis.data.datasets import Record
from lavis.vlm.cached_features import open_for_data
from lavis.vlm.collate import VLMCollator
from lavis.vlm.data_config import VLMDataConfig
from lavis.vlm.processor import VLMConversationDataset
from lavis.vlm.processor_files import load_processor

RUN_PROCESSOR_DIR = "processor"
"""Where a run directory keeps its processor (``save_pretrained``); ``--hf-out`` copies it when the run has no
``model.vlm.path`` (a from-scratch run such as the shapes demo)."""


def save_run_processor(processor: Any, run_dir: Path) -> Path:
    """``processor.save_pretrained(run_dir / processor)``: tokenizer, chat template, image and video processor
    configs, which ``AutoProcessor.from_pretrained`` loads back."""
    out = Path(run_dir) / RUN_PROCESSOR_DIR
    processor.save_pretrained(str(out))
    return out


def processor_ref(budget: VLMDataConfig, model_path: str | None) -> str:
    """Where the run's processor comes from: ``data.vlm.processor``, else the model directory."""
    ref = budget.processor or model_path
    if ref is None:
        raise ValueError("a model.vlm run without model.vlm.path needs data.vlm.processor (a processor directory, or "
                         "builtin:shapes for the demo)")
    return ref


def build_vlm_data(records: Sequence[Record], data: DataConfig, budget: VLMDataConfig | None,
                   model_path: str | None, processor: Any = None) -> tuple[VLMConversationDataset, VLMCollator]:
    """The dataset over ``records`` and its collator (pad id: the processor's tokenizer's). ``processor`` given
    (already loaded) skips :func:`load_processor`."""
    budget = budget or VLMDataConfig()
    processor = processor if processor is not None else load_processor(processor_ref(budget, model_path))
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the VLM processor's tokenizer has no pad token (pad_token in tokenizer_config.json)")
    cache = None
    if data.feature_cache is not None:
        cache = open_for_data(data.feature_cache, processor, budget)
    dataset = VLMConversationDataset(records, processor, data, budget, cache)
    return dataset, VLMCollator(int(pad), data.max_txt_len, data.pad_to_multiple_of)
