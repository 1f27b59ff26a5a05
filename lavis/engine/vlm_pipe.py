"""The pipeline of a transformers VLM run (``model.vlm``): stage plan, this rank's layers and their weights.

``lavis.engine.trainer.build_run`` takes this branch when the config has a ``model.vlm`` section; the optimizer,
engine and loop are the same as for every model.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from lavis.config.schema import Config
from lavis.engine.pipe_module import LavisPipelineModule
from lavis.pipeline.plan import StagePlan, Workload, checkpoint_blocks, offloaded_stages, stage_plan
from lavis.vlm.arch import read_hf_config
from lavis.vlm.cached_features import check_present, open_cache
from lavis.vlm.costs import is_trainable, layer_costs
from lavis.vlm.feature_cache import check_model
from lavis.vlm.layers import build_layer_specs, layer_table, tied_embedding
from lavis.vlm.weights import load_stage
from lavis.weights.report import FileReport

RECOMPUTED_LAYERS = ["DecoderBlockPipe", "VisionBlocksPipe"]
"""What ``train.parallel.activation_checkpoint_interval`` recomputes in backward: groups of that many consecutive
layers of this stage, all of these classes (DeepSpeed's ``checkpointable_layers``; non-reentrant)."""


def vlm_plan(cfg: Config, hf: PretrainedConfig, dp: int) -> StagePlan:
    """``train.parallel.partition`` if given (validated), else the boundary search within
    ``train.parallel.gpu_memory_gib``. The workload is one micro-batch of ``data.max_txt_len`` tokens whose visual
    tokens may fill it (patches = merge^2 x tokens), the most a sample may hold."""
    assert cfg.model.vlm is not None
    t = cfg.train
    tokens = t.batch.micro_batch_size * cfg.data.max_txt_len
    work = Workload(tokens=tokens, seq_len=cfg.data.max_txt_len, images=t.batch.micro_batch_size,
                    param_bytes=4 if t.precision == "fp32" else 2, offloaded_stages=offloaded_stages(t),
                    activation_checkpointing=t.parallel.activation_checkpoint_interval > 0,
                    checkpointed_blocks=checkpoint_blocks(t, hf.text_config.num_hidden_layers))
    merge = hf.vision_config.spatial_merge_size
    return stage_plan(t, layer_costs(hf, cfg.model.vlm, work, patches=tokens * merge**2,
                                     cached=cfg.data.feature_cache is not None), work, dp)


def build_vlm_pipe(cfg: Config, dp: int) -> tuple[LavisPipelineModule, list, StagePlan, list[FileReport]]:
    """This rank's stage of the VLM with its weights (only its own tensors read) and ``requires_grad`` set from
    ``model.vlm.freeze_*``; the layer table; the plan; the weight reports (raises if the directory does not fit)."""
    vlm = cfg.model.vlm
    assert vlm is not None
    t = cfg.train
    hf = read_hf_config(vlm)
    unsupported = [name for name, on in (
        ("model.llm.lora / model.llm.quantize", cfg.model.llm.lora is not None or cfg.model.llm.quantize is not None),
    ) if on]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not supported with model.vlm yet; unset them (the BLIP-2-style "
                         "model's options)")
    table = layer_table(hf, vlm.vision_blocks_per_layer)
    plan = vlm_plan(cfg, hf, dp)
    recompute = checkpoint_blocks(t, hf.text_config.num_hidden_layers)
    cached = cfg.data.feature_cache is not None
    if cached and (not vlm.freeze_vision or not vlm.freeze_merger):
        raise ValueError("data.feature_cache with model.vlm needs model.vlm.freeze_vision: true and "
                         "model.vlm.freeze_merger: true (the cache replaces the tower and the mergers)")
    if cached:
        check_present(cfg.data.feature_cache)  # every rank, before the collective build; stage 0 verifies it below
    pipe = LavisPipelineModule(build_layer_specs(hf, vlm.vision_blocks_per_layer, recompute, cached), plan.parts,
                               offload_stages=offloaded_stages(t), dynamic_shape=True,
                               activation_checkpoint_interval=t.parallel.activation_checkpoint_interval,
                               checkpointable_layers=RECOMPUTED_LAYERS)
    if cached and 0 in pipe.local_layers():  # the stage that reads the cache: built from these weights?
        check_model(open_cache(cfg.data.feature_cache), vlm)
    reports = load_stage(vlm, hf, table, pipe.local_layers())
    pipe.apply_trainable_by(lambda plain: is_trainable(plain, vlm), table)
    if hf.tie_word_embeddings:  # the head is the token embedding: one weight on one stage, summed grads across two
        pipe.tie_weights(*tied_embedding(table))
    return pipe, table, plan, reports
