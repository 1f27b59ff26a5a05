"""The VLM model family (``model.vlm``: a transformers Qwen2.5-VL / Qwen3-VL directory) as a ``ModelFamily``.

Its pieces are transformers' own modules split into the layer list of ``lavis.vlm.layers``; this object hands them to
the trainer, the planner and the tools through the family interface (``lavis.pipeline.family``), like the BLIP-2-style
family. It sits above the pipeline floor (it needs ``lavis.vlm.layers`` / ``weights`` / ``costs`` / ``arch``), so the
table of families is ``lavis.families``, a floor above. The options of the other family this one does not support yet
are refused in one place (:func:`unsupported_vlm_options`), before any layer is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn
from transformers import AutoModelForImageTextToText

from lavis.config.schema import Config, ModelConfig
from lavis.data.conversation import ChatTemplate
from lavis.data.datasets import Record
from lavis.data.step_loader import MicroBatch, StepDataset
from lavis.data.tokenizer import AnyTokenizer
from lavis.model.spec import ModelSpec
from lavis.pipeline.family import BuiltStage, LayerRecipe, RunText
from lavis.pipeline.plan import LayerCost, Workload, checkpoint_blocks
from lavis.vlm.arch import _merge, read_hf_config
from lavis.vlm.cached_features import check_present, open_cache
from lavis.vlm.config import VLMConfig
from lavis.vlm.costs import is_trainable, layer_costs
from lavis.vlm.data import build_vlm_data, processor_ref
from lavis.vlm.data_config import VLMDataConfig
from lavis.vlm.feature_cache import check_model
from lavis.vlm.layers import layer_classes, layer_table, tied_embedding
from lavis.vlm.lora import add_vlm_adapters_, check_vlm_lora
from lavis.vlm.processor_files import load_processor
from lavis.vlm.weights import load_stage
from lavis.weights.report import FileReport

FAMILY = "vlm"
"""This family's name (``lavis.families.FAMILIES``), after its config section ``model.vlm``."""

COMPONENTS = ("vision", "merger", "llm")
"""What ``model.vlm.freeze_*`` freezes: the vision tower, the patch merger (and DeepStack mergers), the LLM."""


def unsupported_vlm_options(cfg: Config) -> list[tuple[str, bool]]:
    """The (option, set in ``cfg``) pairs of the options this family does not support yet."""
    return [
        ("model.llm.lora / model.llm.quantize", cfg.model.llm.lora is not None or cfg.model.llm.quantize is not None),
        ("data.fixed_length", cfg.data.fixed_length)]  # the visual tokens' count differs per sample


def check_vlm_options(cfg: Config) -> None:
    """Refuse :func:`unsupported_vlm_options` that ``cfg`` sets, and a feature cache over a tower or merger that
    trains; every rank checks the cache is there before the collective build (stage 0 checks its model later)."""
    vlm = cfg.model.vlm
    assert vlm is not None
    unsupported = [name for name, on in unsupported_vlm_options(cfg) if on]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not supported with model.vlm yet; unset them (the BLIP-2-style "
                         "model's options; a VLM's adapters are model.vlm.lora / model.vlm.quantize)")
    if cfg.data.feature_cache is not None:
        if not vlm.freeze_vision or not vlm.freeze_merger:
            raise ValueError("data.feature_cache with model.vlm needs model.vlm.freeze_vision: true and "
                             "model.vlm.freeze_merger: true (the cache replaces the tower and the mergers)")
        check_present(cfg.data.feature_cache)


def _vlm(cfg: ModelConfig) -> VLMConfig:
    assert cfg.vlm is not None, "the VLM family describes only configs it claims (model.vlm set)"
    return cfg.vlm


def _published(vlm: VLMConfig, published: dict[str, Any]) -> VLMConfig:
    """``model.vlm`` planned from a published ``config.json`` (before the download): its ``hf_config`` merged over."""
    return replace(vlm, path=None, hf_config=_merge(published, vlm.hf_config))


class VLMFamily:
    """Vision tower (in groups of ``model.vlm.vision_blocks_per_layer`` blocks) -> merger + token embeddings (the
    visual tokens placed, M-RoPE positions computed) -> decoder blocks -> norm -> head: ``lavis.vlm``."""

    name: str = FAMILY
    converter_names: tuple[str, ...] = ()
    """None: a run of this family is exported as a transformers directory (``pipemodel2pth.py --hf-out``)."""
    section: str = "model.vlm"
    recomputed_layers: tuple[str, ...] = ("DecoderBlockPipe", "VisionBlocksPipe")

    def claims(self, cfg: ModelConfig) -> bool:
        return cfg.vlm is not None

    def model_dir(self, cfg: ModelConfig) -> str | None:
        return _vlm(cfg).path

    def describe(self, cfg: ModelConfig, published: dict[str, Any] | None = None) -> ModelSpec:
        """The directory's config (``model.vlm.path``'s ``config.json`` with ``model.vlm.hf_config`` over it), the
        layer table of ``lavis.vlm.layers`` and the components ``model.vlm.freeze_*`` leaves training."""
        vlm = _vlm(cfg)
        hf = read_hf_config(vlm if published is None else _published(vlm, published))
        frozen = {"vision": vlm.freeze_vision, "merger": vlm.freeze_merger, "llm": vlm.freeze_llm}
        return ModelSpec(family=FAMILY, hf=hf, layers=tuple(layer_table(hf, vlm.vision_blocks_per_layer)),
                         trains=tuple(c for c in COMPONENTS if not frozen[c]))

    def build(self, spec: ModelSpec, cfg: ModelConfig, placeholder_id: int) -> nn.Module:
        """transformers' own model of the directory's class (random init; its keys map onto the layer table's by
        ``lavis.vlm.weights.published_key``). ``placeholder_id``: unused, the config names its media tokens."""
        return AutoModelForImageTextToText.from_config(spec.hf)

    def template(self, tok: AnyTokenizer, cfg: Config) -> ChatTemplate:
        raise ValueError("a model.vlm model's prompt is its processor's own chat template (data.vlm.processor or "
                         "model.vlm.path's processor files), not one of model.llm.template's")

    def run_text(self, spec: ModelSpec, cfg: Config) -> RunText:
        """The model's own processor (``data.vlm.processor``, else ``model.vlm.path``'s files); the visual tokens'
        placeholder is the config's ``image_token_id``."""
        processor = load_processor(processor_ref(cfg.data.vlm or VLMDataConfig(), _vlm(cfg.model).path))
        return RunText(int(spec.hf.image_token_id), processor=processor)

    def training_data(self, text: RunText, records: Sequence[Record], cfg: Config,
                      load_media: bool) -> tuple[StepDataset, Callable[[list[Any]], MicroBatch]]:
        """``build_vlm_data`` with ``text``'s processor (``load_media``: unused, the processor makes every sample)."""
        return build_vlm_data(records, cfg.data, cfg.data.vlm, _vlm(cfg.model).path, text.processor)

    def pipeline_layers(self, spec: ModelSpec, cfg: Config, placeholder_id: int) -> list[LayerRecipe]:
        """Every layer allocated uninitialised (each stage reads its own weights next); the options this family does
        not support yet are refused first."""
        check_vlm_options(cfg)
        check_vlm_lora(_vlm(cfg.model), spec.hf)  # QLoRA needs CUDA: refuse before any layer is built
        per = _vlm(cfg.model).vision_blocks_per_layer
        recompute = checkpoint_blocks(cfg.train, spec.num_blocks)
        return [LayerRecipe(cls, args, allocate_only=True)
                for cls, args in layer_classes(spec.hf, per, recompute, cfg.data.feature_cache is not None)]

    def load_layer_weights(self, spec: ModelSpec, cfg: ModelConfig, layers: dict[int, nn.Module]) -> list[FileReport]:
        """From ``model.vlm.path`` (the whole directory checked, only these layers' tensors read), or transformers'
        random init from ``model.vlm.init_seed`` without a path; then ``model.vlm.lora``'s adapters (QLoRA's quantized
        layers first) go into the decoder blocks among ``layers``."""
        reports = load_stage(_vlm(cfg), spec.hf, spec.table, layers)
        add_vlm_adapters_(layers, _vlm(cfg))  # model.vlm.lora / quantize: over the loaded base weights
        return reports

    def layer_costs(self, spec: ModelSpec, cfg: Config, work: Workload) -> list[LayerCost]:
        """The workload's tokens may all be visual tokens (patches = merge^2 x tokens), the most a sample holds."""
        merge = spec.hf.vision_config.spatial_merge_size
        return layer_costs(spec.hf, _vlm(cfg.model), work, patches=work.tokens * merge**2,
                           cached=cfg.data.feature_cache is not None)

    def is_trainable(self, cfg: ModelConfig, plain_key: str) -> bool:
        return is_trainable(plain_key, _vlm(cfg))

    def unsupported_options(self, cfg: Config) -> list[tuple[str, bool]]:
        return unsupported_vlm_options(cfg)

    def prepare_stage(self, spec: ModelSpec, cfg: Config, stage: BuiltStage) -> None:
        """Tied embeddings (the head is the token embedding): one weight on one stage, gradients summed across two;
        the stage reading a feature cache checks it was built from these tower and merger weights."""
        if spec.hf.tie_word_embeddings:
            stage.tie_weights(*tied_embedding(list(spec.table)))
        if cfg.data.feature_cache is not None and 0 in stage.local_layers():
            check_model(open_cache(cfg.data.feature_cache), _vlm(cfg.model))
