"""The pipeline of a transformers VLM run (``model.vlm``): stage plan, this rank's layers and their weights.

``lavis.engine.trainer.build_run`` takes this branch when the config has a ``model.vlm`` section; the optimizer,
engine and loop are the same as for every model.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from lavis.config.schema import Config
from lavis.engine.pipe_module import LavisPipelineModule
from lavis.pipeline.plan import StagePlan, Workload, offloaded_stages, stage_plan
from lavis.vlm.arch import read_hf_config
from lavis.vlm.costs import is_trainable, layer_costs
from lavis.vlm.layers import build_layer_specs, layer_table
from lavis.vlm.lora import add_vlm_adapters_, check_vlm_lora
from lavis.vlm.weights import load_stage
from lavis.weights.report import FileReport


def vlm_plan(cfg: Config, hf: PretrainedConfig, dp: int) -> StagePlan:
    """``train.parallel.partition`` if given (validated), else the boundary search within
    ``train.parallel.gpu_memory_gib``. The workload is one micro-batch of ``data.max_txt_len`` tokens whose visual
    tokens may fill it (patches = merge^2 x tokens), the most a sample may hold."""
    assert cfg.model.vlm is not None
    t = cfg.train
    tokens = t.batch.micro_batch_size * cfg.data.max_txt_len
    work = Workload(tokens=tokens, seq_len=cfg.data.max_txt_len, images=t.batch.micro_batch_size,
                    param_bytes=4 if t.precision == "fp32" else 2, offloaded_stages=offloaded_stages(t))
    merge = hf.vision_config.spatial_merge_size
    return stage_plan(t, layer_costs(hf, cfg.model.vlm, work, patches=tokens * merge**2), work, dp)


def build_vlm_pipe(cfg: Config, dp: int) -> tuple[LavisPipelineModule, list, StagePlan, list[FileReport]]:
    """This rank's stage of the VLM with its weights (only its own tensors read) and ``requires_grad`` set from
    ``model.vlm.freeze_*``; the layer table; the plan; the weight reports (raises if the directory does not fit)."""
    vlm = cfg.model.vlm
    assert vlm is not None
    t = cfg.train
    hf = read_hf_config(vlm)
    if hf.tie_word_embeddings and not vlm.freeze_llm:
        raise ValueError(f"{vlm.path or 'model.vlm.hf_config'}: tie_word_embeddings is true (the LM head is the token "
                         "embedding); training the LLM with tied embeddings across stages is not supported yet: set "
                         "model.vlm.freeze_llm: true (or train a model with untied embeddings)")
    unsupported = [name for name, on in (
        ("train.parallel.activation_checkpoint_interval / activation_checkpoint_blocks",
         t.parallel.activation_checkpoint_interval or t.parallel.activation_checkpoint_blocks),
        ("model.llm.lora / model.llm.quantize", cfg.model.llm.lora is not None or cfg.model.llm.quantize is not None),
        ("data.feature_cache", cfg.data.feature_cache is not None)) if on]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not supported with model.vlm yet; unset them (the BLIP-2-style "
                         "model's options)")
    check_vlm_lora(vlm, hf)  # QLoRA needs CUDA: refuse before any layer is built
    table = layer_table(hf, vlm.vision_blocks_per_layer)
    plan = vlm_plan(cfg, hf, dp)
    pipe = LavisPipelineModule(build_layer_specs(hf, vlm.vision_blocks_per_layer), plan.parts,
                               offload_stages=offloaded_stages(t), dynamic_shape=True)
    reports = load_stage(vlm, hf, table, pipe.local_layers())
    add_vlm_adapters_(pipe.local_layers(), vlm)  # model.vlm.lora / quantize: over the loaded base weights
    pipe.apply_trainable_by(lambda plain: is_trainable(plain, vlm), table)
    return pipe, table, plan, reports
