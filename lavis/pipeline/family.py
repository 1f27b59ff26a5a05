"""Model families: the interface (``ModelFamily``) and the BLIP-2-style family's object.

A family is how an architecture plugs in (docs/CONTRIBUTING.md, "Add a model family"). The table of families
(``FAMILIES``, with ``describe`` / ``plan``) is ``lavis.families``, a floor above both this module and the families
whose modules sit above the pipeline floor (``lavis.vlm.family``). A family's object (``ModelFamily``) provides:

- ``name``, and ``converter_names``: the weight-name conventions the converters may write for it (``--names``);
- ``section``: the config section that names the model's files (``model.llm``), and ``model_dir(cfg)``: the
  directory whose ``config.json`` ``describe`` reads (None: the section's ``hf_config`` alone);
- ``claims(cfg)``: whether a model config (``ModelConfig``) is this family's. ``lavis.families.family_of`` asks the
  families in table order; the BLIP-2-style family claims every config and comes last, so a new family goes before
  it;
- ``describe(cfg, published)``: the ``lavis.model.spec.ModelSpec``: the family's transformers config (the
  BLIP-2-style family's ``describe`` is the only caller of ``lavis.model.llm.llm_hf_config``; a VLM's is its
  directory's), the LLM's dimensions, layer table, which components train. ``published``: a config.json's content
  for planning before the weights are downloaded;
- ``build(spec, cfg, placeholder_id)``: the plain model, an ``nn.Module`` whose ``state_dict`` keys are the layer
  table's plain names, or map onto them by the family's own rule (chat, eval, inspect and the converters' checks run
  it);
- ``template(tok, cfg)``: the chat template (``lavis.data.conversation.ChatTemplate``) for a ``Config``, where the
  family's prompts are ours (a family whose prompts are its processor's refuses);
- ``run_text(spec, cfg)``: what makes a training run's samples (:class:`RunText`): a tokenizer and template, or a
  transformers processor; the trainer saves it in the run directory;
- ``training_data(text, records, cfg, load_media)``: the dataset over a run's records and its collator, for the
  shared sampler and ``lavis.data.step_loader.StepLoader``;
- ``pipeline_layers(spec, cfg, placeholder_id)``: the pipeline's layer list for a ``Config``, one ``LayerRecipe``
  (class and arguments, built only on the rank that holds the layer) per entry of ``spec.layers``. What travels
  between layers (hidden states, masks, position ids such as M-RoPE's 3 x L, features that later layers add) is the
  family's own tuple: the pipeline passes it on and never looks inside;
- ``load_layer_weights(spec, cfg, layers)``: fill one stage's layers (``{layer index: module}``) from the files the
  model config names, every key accounted for (raises on a file that does not fit);
- ``layer_costs(spec, cfg, work)``: the planner's per-layer estimates (``lavis.pipeline.plan.LayerCost``, one per
  entry of ``spec.layers``) for a ``Config`` and a ``Workload``;
- ``is_trainable(cfg, plain_key)``: whether the weight of that plain name trains under a model config;
- ``unsupported_options(cfg)``: (option, set in ``cfg``) pairs of the config's options this family does not support
  (yet); ``pipeline_layers`` refuses those set, ``python -m lavis.plan`` offers none of them as a knob;
- ``recomputed_layers``: the layer class names ``train.parallel.activation_checkpoint_interval`` recomputes;
- ``prepare_stage(spec, cfg, stage)``: after a built stage's weights are read and ``requires_grad`` set (every rank):
  weights tied across layers (on one stage or across two), checks of what the stage reads besides its weights.

Every entry point (the trainer's ``build_run``, ``python -m lavis.plan``, the converters, chat's model loading, eval,
the feature cache builder, bench, the GPU check, inspect) calls ``lavis.families.describe`` once and hands the spec on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from lavis.config.schema import Config, ModelConfig
from lavis.data.cache_features import cache_level
from lavis.data.collate import Collator
from lavis.data.conversation import ChatTemplate, template_from_config
from lavis.data.datasets import ConversationDataset, Record
from lavis.data.step_loader import MicroBatch, StepDataset
from lavis.data.tokenizer import AnyTokenizer, load_tokenizer
from lavis.model import mllm
from lavis.model.freezing import is_trainable
from lavis.model.llm import DecoderParts, decoder_parts
from lavis.model.lora import check_quantize_runtime
from lavis.model.spec import ModelSpec
from lavis.pipeline.layers import DecoderBlockPipe, FinalNormPipe, LMHeadPipe, VisionEmbedPipe, load_layer_weights
from lavis.pipeline.plan import LayerCost, Workload, checkpoint_blocks, layer_costs
from lavis.weights.report import FileReport


@dataclass(frozen=True)
class LayerRecipe:
    """One pipeline layer: ``cls(*args)`` is built on the rank that holds it (DeepSpeed's ``LayerSpec``)."""

    cls: type[nn.Module]
    args: tuple[Any, ...]
    allocate_only: bool = False
    """Built on the meta device, then allocated uninitialised: its weights are read next, so no random init is
    drawn for them (a large published model's layers)."""


@dataclass(frozen=True)
class RunText:
    """What makes a training run's samples, from its family (``ModelFamily.run_text``); the run directory keeps it."""

    placeholder_id: int
    """The token id that stands for visual features in the prompt (``lavis_meta.json`` records it)."""
    tokenizer: AnyTokenizer | None = None
    """``model.llm.tokenizer`` (the BLIP-2-style family): the run directory keeps its file, a resume compares it."""
    template: ChatTemplate | None = None
    """The chat template over ``tokenizer`` (the BLIP-2-style family)."""
    processor: Any = None
    """A transformers processor (the VLM family): its tokenizer, chat template and image / video processors make the
    samples; the run directory keeps it under ``processor/``."""


class BuiltStage(Protocol):
    """What :meth:`ModelFamily.prepare_stage` may do with one built pipeline stage (``LavisPipelineModule``)."""

    def local_layers(self) -> dict[int, nn.Module]: ...

    def tie_weights(self, first: tuple[int, str], second: tuple[int, str]) -> None: ...


class ModelFamily(Protocol):
    """The pieces a model family provides (see the module docstring)."""

    name: str
    converter_names: tuple[str, ...]
    section: str
    recomputed_layers: tuple[str, ...]
    """Class names of the layers ``train.parallel.activation_checkpoint_interval`` recomputes in backward."""

    def claims(self, cfg: ModelConfig) -> bool: ...

    def model_dir(self, cfg: ModelConfig) -> str | None: ...

    def describe(self, cfg: ModelConfig, published: dict[str, Any] | None = None) -> ModelSpec: ...

    def build(self, spec: ModelSpec, cfg: ModelConfig, placeholder_id: int) -> nn.Module: ...

    def template(self, tok: AnyTokenizer, cfg: Config) -> ChatTemplate: ...

    def run_text(self, spec: ModelSpec, cfg: Config) -> RunText: ...

    def training_data(self, text: RunText, records: Sequence[Record], cfg: Config,
                      load_media: bool) -> tuple[StepDataset, Callable[[list[Any]], MicroBatch]]: ...

    def pipeline_layers(self, spec: ModelSpec, cfg: Config, placeholder_id: int) -> list[LayerRecipe]: ...

    def load_layer_weights(self, spec: ModelSpec, cfg: ModelConfig, layers: dict[int, nn.Module]) -> list[FileReport]:
        ...

    def layer_costs(self, spec: ModelSpec, cfg: Config, work: Workload) -> list[LayerCost]: ...

    def is_trainable(self, cfg: ModelConfig, plain_key: str) -> bool: ...

    def unsupported_options(self, cfg: Config) -> list[tuple[str, bool]]: ...

    def prepare_stage(self, spec: ModelSpec, cfg: Config, stage: BuiltStage) -> None:
        """After the stage's weights are read and ``requires_grad`` set (collective: every rank calls it): weights
        tied across layers, checks of what the stage reads besides its weights."""
        ...


def blip2_layers(
    cfg: ModelConfig, hf: Any, parts: DecoderParts, placeholder_id: int, recompute_blocks: frozenset[int] = frozenset(),
    feature_cache: str | None = None, float_mask: bool = False, spec: ModelSpec | None = None,
) -> list[LayerRecipe]:
    """``[VisionEmbedPipe] [DecoderBlockPipe] x n [FinalNormPipe] [LMHeadPipe]``. ``recompute_blocks``: decoder
    block indices recomputed in backward (``train.activation_recompute_blocks``); ``feature_cache``:
    ``data.feature_cache`` (stage 0 then builds no frozen vision module); ``float_mask``:
    ``train.parallel.inter_stage_mask == "float_additive"``; ``spec``: the model's description (checks a feature
    cache)."""
    check_quantize_runtime(cfg)  # QLoRA needs CUDA: refuse before any layer is built
    seed, std = cfg.init_seed, cfg.init_std
    n = hf.num_hidden_layers
    lora, quantize = cfg.llm.lora, cfg.llm.quantize
    layers = [LayerRecipe(VisionEmbedPipe, (cfg, hf, placeholder_id, seed, feature_cache, float_mask, spec))]
    layers += [LayerRecipe(DecoderBlockPipe, (hf, parts, j, seed + 1 + j, std, j in recompute_blocks, lora, quantize))
               for j in range(n)]
    layers += [LayerRecipe(FinalNormPipe, (hf, parts, seed + 1 + n, std)),
               LayerRecipe(LMHeadPipe, (hf, seed + 2 + n, std))]
    return layers


class Blip2Family:
    """ViT -> ln_vision -> Q-Former (optional) -> projection -> decoder LLM (Qwen, Vicuna, LLaMA): ``lavis.model``."""

    name: str = mllm.FAMILY
    converter_names: tuple[str, ...] = ("auto", "ours", "qwen_v1", "minigpt4")
    section: str = "model.llm"
    recomputed_layers: tuple[str, ...] = ("DecoderBlockPipe",)

    def claims(self, cfg: ModelConfig) -> bool:
        return True  # the default: every config no other family claims

    def model_dir(self, cfg: ModelConfig) -> str | None:
        return cfg.llm.path

    def describe(self, cfg: ModelConfig, published: dict[str, Any] | None = None) -> ModelSpec:
        return mllm.describe(cfg, published)

    def build(self, spec: ModelSpec, cfg: ModelConfig, placeholder_id: int) -> nn.Module:
        return mllm.MultimodalLM(cfg, placeholder_id, spec)

    def template(self, tok: AnyTokenizer, cfg: Config) -> ChatTemplate:
        return template_from_config(tok, cfg)

    def run_text(self, spec: ModelSpec, cfg: Config) -> RunText:
        """``model.llm.tokenizer`` (which must fit the LLM's vocabulary) and the template over it."""
        tok = load_tokenizer(cfg.model.llm.tokenizer)
        if tok.vocab_size > spec.hf.vocab_size:
            raise ValueError(
                f"tokenizer {tok.source} has {tok.vocab_size} tokens but model.llm vocab_size is {spec.hf.vocab_size}"
            )
        tpl = self.template(tok, cfg)
        return RunText(tpl.placeholder_id, tokenizer=tok, template=tpl)

    def training_data(self, text: RunText, records: Sequence[Record], cfg: Config,
                      load_media: bool) -> tuple[StepDataset, Callable[[list[Any]], MicroBatch]]:
        """``ConversationDataset`` over ``text``'s template (``load_media``: False on the last stage, which reads
        only labels) and the padding ``Collator``."""
        assert text.template is not None, "this family's run_text gives a template"
        tpl = text.template
        dataset = ConversationDataset(records, tpl, cfg.data, cfg.model.vision.image_size, load_media=load_media,
                                      label_mode=cfg.data.label_mode)
        return dataset, Collator(tpl.special_ids().pad, cfg.data.max_txt_len, cfg.data.pad_to_multiple_of,
                                 cfg.data.fixed_length)

    def pipeline_layers(self, spec: ModelSpec, cfg: Config, placeholder_id: int) -> list[LayerRecipe]:
        t = cfg.train
        return blip2_layers(cfg.model, spec.hf, decoder_parts(spec.hf), placeholder_id,
                            checkpoint_blocks(t, spec.num_blocks), feature_cache=cfg.data.feature_cache,
                            float_mask=t.parallel.inter_stage_mask == "float_additive", spec=spec)

    def load_layer_weights(self, spec: ModelSpec, cfg: ModelConfig, layers: dict[int, nn.Module]) -> list[FileReport]:
        return load_layer_weights(cfg, layers, spec.table, spec=spec)

    def layer_costs(self, spec: ModelSpec, cfg: Config, work: Workload) -> list[LayerCost]:
        cached = cache_level(cfg.model) if cfg.data.feature_cache is not None else None
        return layer_costs(cfg.model, spec.dims, work, cached)

    def is_trainable(self, cfg: ModelConfig, plain_key: str) -> bool:
        return is_trainable(plain_key, cfg)

    def unsupported_options(self, cfg: Config) -> list[tuple[str, bool]]:
        return []  # the options of the config schema are this family's

    def prepare_stage(self, spec: ModelSpec, cfg: Config, stage: BuiltStage) -> None:
        return None  # no tied weights; the feature cache is checked by the vision layer that reads it

