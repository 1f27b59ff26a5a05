"""Typed configuration tree: the single source of every option.

A YAML recipe is a strictly loaded instance of :class:`Config` (see ``load.py``): unknown keys are errors,
values are type-checked, and cross-field rules live in ``__post_init__``. The DeepSpeed JSON is derived from
``TrainConfig`` so the learning rate, batch sizes and precision each live in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lavis.lora_config import LoRAConfig
from lavis.vlm.config import VLMConfig
from lavis.vlm.data_config import VLMDataConfig

DatasetFormat = Literal["canonical", "mpp", "llava", "llava_pretrain", "videochatgpt", "minigpt4_captions",
                        "webdataset", "sharegpt"]
"""``data.train[].format``: the names of ``lavis.data.formats.FORMATS``, one reader and converter each (a test keeps the
two equal; config sits below data, so the schema names them and the table implements them)."""
TemplateName = Literal["chatml", "qwen3", "llama3", "vicuna_v0", "minigpt4_vicuna", "minigpt4_llama2", "vicuna_v1_1",
                       "llama2"]
"""``model.llm.template``: the names of ``lavis.data.templates.TEMPLATES`` (a test keeps the two equal)."""


def check_range(ok: bool, key: str, rule: str, value: Any) -> None:
    """Range checks of ``__post_init__``: ``ValueError`` naming the full key, the rule and the value given
    (``from_dict`` turns it into a ``ConfigError`` naming the file)."""
    if not ok:
        raise ValueError(f"{key} must be {rule} (got {value!r})")


@dataclass
class VisionConfig:
    """EVA-style ViT (timm ``Eva`` with LAVIS parameter names) followed by ``ln_vision``."""

    image_size: int = 224
    """Input side in pixels; must be a multiple of ``patch_size``."""
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    """BLIP-2 uses 39 of EVA-CLIP-g's 40 blocks."""
    num_heads: int = 16
    mlp_hidden: int = 6144
    ln_vision_eps: float = 1e-5
    """LAVIS ``ln_vision`` uses the torch default 1e-5 (HF's port uses 1e-6)."""
    checkpoint: str | None = None
    """``eva_vit_g.pth`` (LAVIS layout); None = random init (demo, benchmarks)."""
    frozen: bool = True
    """Frozen vision runs under ``torch.no_grad()`` and in eval mode."""
    precision: Literal["fp32", "fp16"] = "fp32"
    """``fp16``: LAVIS ``convert_weights_to_fp16`` (Conv/Linear weights fp16; LayerNorms, ``cls_token``,
    ``pos_embed``, ``q_bias``/``v_bias`` fp32; forward under fp16 autocast). A whole-model bf16 cast overrides it."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_hidden"):
            check_range(getattr(self, name) >= 1, f"model.vision.{name}", ">= 1", getattr(self, name))
        check_range(self.ln_vision_eps > 0, "model.vision.ln_vision_eps", "> 0", self.ln_vision_eps)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.vision.image_size ({self.image_size}) must be a multiple of "
                f"model.vision.patch_size ({self.patch_size})"
            )
        if self.width % self.num_heads:
            raise ValueError(f"model.vision.width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.precision == "fp16" and not self.frozen:
            raise ValueError("model.vision.precision: fp16 needs model.vision.frozen: true (fp16 weights do not train; "
                             "MiniGPT-4 also forces fp32 for a trainable ViT); set precision: fp32")


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former run query-only (transformers ``Blip2QFormerModel``)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    dropout: float = 0.1
    checkpoint: str | None = None
    """``blip2_pretrained_flant5xxl.pth``: Q-Former, ``query_tokens`` and ``ln_vision``."""
    frozen: bool = True
    enabled: bool = True
    """False: no Q-Former (MiniGPT-4's LLaMA-2 model, its ``has_qformer: False``). The ViT's patch tokens (cls token
    dropped, after ``ln_vision``), ``patch_concat`` consecutive ones concatenated, go straight into ``llm_proj``; the
    other Q-Former keys are unused and ``checkpoint`` must be null (``ln_vision`` keeps its default init 1/0, which
    MiniGPT-4 never loads either)."""
    patch_concat: int = 4
    """Without a Q-Former: patch tokens concatenated per image token (MiniGPT-4: 4, so ViT-g's 256 patches of width
    1408 become 64 tokens of width 5632)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_query_tokens",
                     "cross_attention_freq", "patch_concat"):
            check_range(getattr(self, name) >= 1, f"model.qformer.{name}", ">= 1", getattr(self, name))
        check_range(0 <= self.dropout < 1, "model.qformer.dropout", "in [0, 1)", self.dropout)


@dataclass
class ProjectionConfig:
    """Maps Q-Former outputs into the LLM embedding space (``llm_proj`` in MPP-Qwen)."""

    kind: Literal["linear", "mlp"] = "linear"
    frozen: bool = False


@dataclass
class LLMConfig:
    """A transformers decoder LLM (Qwen2 / Qwen3 / LLaMA family classes)."""

    path: str | None = None
    """HF model directory with ``config.json`` and weights. None = random init from ``hf_config``."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """Inline transformers config (must contain ``model_type``); overrides keys of ``path``'s config."""
    tokenizer: str = "builtin:shapes"
    """A tokenizer directory / ``tokenizer.json``, or ``builtin:shapes`` (the demo's local BPE)."""
    template: TemplateName = "chatml"
    """Chat layout: a name of the template table (``lavis/data/templates.py``): chatml, qwen3, llama3, vicuna_v0,
    minigpt4_vicuna, minigpt4_llama2, vicuna_v1_1, llama2."""
    system_prompt: str | None = None
    """None = the template's own (the table's ``system_prompt``: Qwen's "You are a helpful assistant." for ChatML,
    MiniGPT-4's image preamble for vicuna_v0 and minigpt4_llama2, FastChat's for vicuna_v1_1, none otherwise)."""
    image_placeholder: str = "<|extra_0|>"
    """Token whose positions are overwritten by image embeddings (Qwen v1: ``<|extra_0|>`` = 151646)."""
    frozen: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    lora: LoRAConfig | None = None
    """Train low-rank adapters instead of the LLM's weights (needs ``frozen: true``); None = no adapters."""
    quantize: Literal["nf4", "int8"] | None = None
    """QLoRA: hold the frozen decoder-block weights quantized with bitsandbytes (4-bit NF4 or 8-bit; compute in
    bf16). CUDA only; needs ``lora``."""

    def __post_init__(self) -> None:
        if self.path is None and "model_type" not in self.hf_config:
            raise ValueError("model.llm needs either `path` (an HF model directory) or `hf_config.model_type`")
        if self.lora is not None and not self.frozen:
            raise ValueError("model.llm.lora trains adapters over frozen base weights: set model.llm.frozen: true")
        if self.quantize is not None and self.lora is None:
            raise ValueError(f"model.llm.quantize: {self.quantize} holds frozen weights quantized, which only makes "
                             "sense with adapters: set model.llm.lora (or remove quantize)")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(hf_config={"model_type": "qwen2"}))
    checkpoint: str | None = None
    """A ``.pth`` loaded on top of the base weights (our converters' output or a predecessor's)."""
    init_seed: int = 0
    """Seed of the per-layer random init: layer ``i`` is initialised from ``init_seed + i`` whatever the partition."""
    init_std: float = 0.02
    """Std of the random init of weight matrices (transformers' ``initializer_range``). 0.02 suits wide models;
    a from-scratch tiny model (width 128) learns faster with about 1/sqrt(width)."""
    vlm: VLMConfig | None = None
    """A transformers VLM (Qwen2.5-VL / Qwen3-VL directory, ``lavis.vlm``) instead of the BLIP-2-style stack above;
    None = the BLIP-2-style model."""

    def __post_init__(self) -> None:
        check_range(self.init_std > 0, "model.init_std", "> 0", self.init_std)
        if not self.qformer.enabled:
            self._check_without_qformer()

    def _check_without_qformer(self) -> None:
        q, patches = self.qformer, (self.vision.image_size // self.vision.patch_size) ** 2
        if q.checkpoint is not None:
            raise ValueError("model.qformer.checkpoint must be null when model.qformer.enabled is false (there is no "
                             f"Q-Former to load; got {q.checkpoint!r})")
        if not q.frozen:
            raise ValueError("model.qformer.frozen: false needs model.qformer.enabled: true (there is no Q-Former to "
                             "train); set frozen: true")
        if patches % q.patch_concat:
            raise ValueError(f"model.qformer.patch_concat ({q.patch_concat}) must divide the ViT's {patches} patch "
                             f"tokens (model.vision.image_size / patch_size squared)")

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens (placeholders) per image or video frame: the Q-Former's queries, or without a Q-Former the
        ViT's patch tokens over ``patch_concat``."""
        if self.qformer.enabled:
            return self.qformer.num_query_tokens
        return (self.vision.image_size // self.vision.patch_size) ** 2 // self.qformer.patch_concat

    @property
    def projection_in_dim(self) -> int:
        """Width of what ``llm_proj`` reads: the Q-Former's hidden size, or ``patch_concat`` x the ViT width."""
        return self.qformer.hidden_size if self.qformer.enabled else self.qformer.patch_concat * self.vision.width


@dataclass
class DatasetConfig:
    ann_path: str
    """Annotation JSON (a list of records) or JSONL; MiniGPT-4's ``filter_cap.json``; for ``webdataset`` a tar shard,
    a directory of shards or a brace pattern (``shards/{00000..00099}.tar``)."""
    vis_root: str = ""
    """Directory that image / video paths in the records are relative to."""
    format: DatasetFormat = "canonical"
    """``canonical`` (DATA.md), ``mpp`` (MPP-Qwen instruction/output JSON), ``llava`` (LLaVA conversations),
    ``llava_pretrain`` (LLaVA-Pretrain ``blip_laion_cc_sbu_558k.json``), ``videochatgpt`` (Video-ChatGPT: raw
    ``{video_id, q, a}``, its training file, or MPP-Qwen-Next's conversion), ``minigpt4_captions`` (MiniGPT-4's
    ``filter_cap.json``), ``webdataset`` (tar shards of image + caption); see ``lavis/data/formats.py``."""
    video_extensions: list[str] = field(default_factory=lambda: ["mp4", "mkv", "webm"])
    """A video named by id or by a feature file (Video-ChatGPT's ``v_xxx.pkl``) is the first existing
    ``<vis_root>/<id>.<ext>`` over these extensions."""
    image_first: bool | None = None
    """Move each turn's ``<image>`` markers to its front, then a newline (LLaVA's preprocessing). None = true for
    ``llava`` and ``llava_pretrain``, false otherwise."""
    weight: float = 1.0
    """Sampling weight when several datasets are mixed (> 0)."""

    def __post_init__(self) -> None:
        check_range(self.weight > 0, f"data.train[].weight (dataset {self.ann_path})", "> 0", self.weight)


@dataclass
class TransformConfig:
    kind: Literal["blip2_train", "eval"] = "blip2_train"
    """``blip2_train``: RandomResizedCrop(scale=(min_scale, 1)) + flip; ``eval``: bicubic squash (+ flip if set)."""
    min_scale: float = 0.5
    hflip: bool = True

    def __post_init__(self) -> None:
        check_range(0 < self.min_scale <= 1, "data.transform.min_scale", "in (0, 1]", self.min_scale)


@dataclass
class DataConfig:
    train: list[DatasetConfig] = field(default_factory=list)
    max_txt_len: int = 512
    """Maximum tokens per sample, image placeholders included."""
    num_video_frames: int = 32
    transform: TransformConfig = field(default_factory=TransformConfig)
    pad_to_multiple_of: int = 64
    fixed_length: bool = False
    """Pad every micro-batch to ``max_txt_len`` (parity with the predecessors) instead of dynamic padding."""
    num_workers: int = 0
    """DataLoader worker processes per rank for decoding (0 = in the training process)."""
    label_mode: Literal["mpp", "assistant"] = "mpp"
    """``mpp``: MPP-Qwen / QwenLM masking (default, comparable results); ``assistant``: answers + end token only."""
    length_policy: Literal["truncate", "drop"] = "truncate"
    """Over-long samples: ``truncate`` text after the last image run, or ``drop`` the sample (counted through
    ``on_bad_sample``). A sample whose image runs do not fit is a bad sample under both policies."""
    on_bad_sample: Literal["raise", "skip"] = "raise"
    """A sample that cannot be built (missing/corrupt media, too long, malformed) stops training naming the record
    (``raise``), or is left out of its micro-batch, logged with its id and counted (``skip``); never replaced."""
    group_by_length: bool = False
    """Sort each optimizer step's samples by token length before cutting them into micro-batches (less padding;
    data order stays a pure function of the step)."""
    video_fps: float | None = None
    """None: ``num_video_frames`` frames uniformly over the whole clip (MPP parity). A rate: frames every
    ``1/video_fps`` s from the start, at most ``num_video_frames`` (short clips repeat frames to fill)."""
    video_same_augment: bool = True
    """The same random crop/flip for every frame of a clip (MPP-Qwen-Next augments each frame on its own)."""
    allow_outside_root: bool = False
    """Accept image / video paths that lead outside their dataset's ``vis_root`` (``../x``, absolute paths
    elsewhere). Off: such a record is an error naming ``file:index``, the record id and the path."""

    feature_cache: str | None = None
    """Directory written by ``python -m lavis.data.cache_features``: stage 0 reads the frozen vision side's outputs
    from it instead of decoding pixels, and does not build the frozen modules (refused if built from other weights
    or with another transform)."""
    vlm: VLMDataConfig | None = None
    """A ``model.vlm`` run's processor and pixel / frame budgets (``lavis.vlm.data_config``); None = the model
    directory's processor as published."""

    def __post_init__(self) -> None:
        for name in ("max_txt_len", "num_video_frames", "pad_to_multiple_of"):
            check_range(getattr(self, name) >= 1, f"data.{name}", ">= 1", getattr(self, name))
        check_range(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)
        check_range(self.video_fps is None or self.video_fps > 0, "data.video_fps", "> 0 or null", self.video_fps)


@dataclass
class EvalBenchmarkConfig:
    """One benchmark file scored with ``lavis.eval`` during training (``train.eval.generate``)."""

    task: Literal["vqa", "mcq", "yesno", "caption", "video-qa", "gqa", "vizwiz", "okvqa"]
    data: str
    """The benchmark file as distributed (see README "Evaluate")."""
    images: str | None = None
    """Directory its image / video names are relative to."""
    annotations: str | None = None
    """vqa: the VQAv2 / OK-VQA annotations file for ``data``'s questions."""
    split: str | None = None
    """mcq ScienceQA: only this split."""
    prompt: str | None = None
    """Prompt template instead of the task's (``str.format`` fields, e.g. ``"{question}"``)."""
    name: str | None = None
    """Metric name prefix: the row gets ``eval_<name>_<metric>``; default the task name."""


@dataclass
class TrainEvalConfig:
    """Held-out evaluation during training (every ``every`` optimizer steps, after the step)."""

    every: int = 0
    """Evaluate after every N-th optimizer step (0: never)."""
    data: list[DatasetConfig] = field(default_factory=list)
    """Held-out conversation datasets (same formats as ``data.train``); their loss is ``eval_loss``, computed
    through the pipeline on all stages (eval transform, no augmentation)."""
    max_samples: int = 64
    """Use the first N records of ``data`` (in order) for the loss, and at most N samples per benchmark."""
    generate: bool = False
    """Also generate answers to ``benchmarks`` and log their scores (rank 0 gathers the full model and runs it on
    its device: one extra full copy of the weights there, plus generation time; keep the sets small)."""
    benchmarks: list[EvalBenchmarkConfig] = field(default_factory=list)
    """Benchmarks scored when ``generate`` is true."""
    batch_size: int = 8
    """Generation batch size for ``benchmarks``."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.max_samples < 1 or self.batch_size < 1:
            raise ValueError("train.eval.every must be >= 0, train.eval.max_samples and train.eval.batch_size >= 1")
        if self.every and not self.data and not (self.generate and self.benchmarks):
            raise ValueError("train.eval.every is set but there is nothing to evaluate: add train.eval.data "
                             "(held-out loss) and/or train.eval.generate: true with train.eval.benchmarks")
        if self.generate and not self.benchmarks:
            raise ValueError("train.eval.generate: true needs train.eval.benchmarks (the files to score)")


@dataclass
class OptimConfig:
    """``train.optim``: the optimizer, its schedule and where its state lives."""

    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "adamw_bf16"] = "adamw"
    """``adamw``: torch's AdamW, fp32 moments (8 bytes per trained parameter). ``adamw8bit``: bitsandbytes'
    blockwise 8-bit AdamW (2 bytes for both moments; tensors under 4,096 elements keep fp32 moments, as
    bitsandbytes does). ``paged_adamw8bit``: the same with its state in CUDA unified memory, paged to host RAM under
    memory pressure (on a CPU it runs as ``adamw8bit``). ``adamw_bf16``: AdamW on the bf16 weights themselves, no
    fp32 master copy; each update is added with Kahan compensation (a bf16 buffer per weight carries the rounding
    error of one update into the next), which is deterministic, so runs reproduce across layouts and resume exactly
    (stochastic rounding would need per-parameter random state, checkpointed and re-split on a layout change).
    12 bytes per trained parameter in all (weight 2, gradient 2, first moment bf16 2, second moment fp32 4,
    compensation 2) against mixed-precision AdamW's 20; needs ``train.precision: bf16`` and ``zero_stage: 0``. All
    of them under the same global-norm clipping and non-finite guard; the 8-bit ones need bitsandbytes
    (``pip install -e '.[quant]'``)."""
    lr: float = 1e-4
    """Peak learning rate (after warmup; then cosine down to ``min_lr`` at ``train.max_steps``)."""
    min_lr: float = 0.0
    """Learning rate at the last step."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    weight_decay: float = 0.05
    """AdamW weight decay of weight matrices (biases, norms and other vectors get none)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon (MPP-Qwen uses 1e-7)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip across all stages; 0 disables."""
    zero_stage: Literal[0, 1] = 0
    """DeepSpeed ZeRO stage: 1 partitions the optimizer state over the data-parallel replicas."""
    offload_optimizer: bool = False
    """ZeRO-1 only: keep fp32 master weights and Adam state in host RAM and step them on the CPU (DeepSpeed
    ZeRO-Offload with our AdamW). Frees about 12 bytes per trainable parameter of GPU memory; costs PCIe traffic and
    CPU time per step."""

    def __post_init__(self) -> None:
        check_range(self.lr > 0, "train.optim.lr", "> 0", self.lr)
        check_range(0 <= self.min_lr <= self.lr, "train.optim.min_lr", f"in [0, train.optim.lr = {self.lr}]",
                    self.min_lr)
        check_range(self.warmup_steps >= 0, "train.optim.warmup_steps", ">= 0", self.warmup_steps)
        check_range(self.weight_decay >= 0, "train.optim.weight_decay", ">= 0", self.weight_decay)
        check_range(all(0 <= b < 1 for b in self.betas), "train.optim.betas", "two values in [0, 1)",
                    list(self.betas))
        check_range(self.grad_clip >= 0, "train.optim.grad_clip", ">= 0 (0 disables clipping)", self.grad_clip)
        check_range(self.eps > 0, "train.optim.eps", "> 0", self.eps)
        if self.offload_optimizer and self.zero_stage != 1:
            raise ValueError("train.optim.offload_optimizer needs train.optim.zero_stage: 1 (DeepSpeed offloads ZeRO "
                             "optimizer state)")


@dataclass
class BatchConfig:
    """``train.batch``: how many samples one optimizer step takes (per data-parallel replica)."""

    micro_batch_size: int = 1
    """Samples per micro-batch (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps)."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("train.batch.micro_batch_size and train.batch.grad_accum_steps must be >= 1")


@dataclass
class ParallelConfig:
    """``train.parallel``: the pipeline's stages and what each stage keeps in memory."""

    num_stages: int = 1
    """Pipeline stages (processes = stages x data-parallel replicas)."""
    partition: list[int] | None = None
    """Explicit stage boundaries, e.g. [0, 3, 5] for 2 stages over 5 layers; None = planned."""
    gpu_memory_gib: float | None = None
    """Per-GPU memory the planner must stay within (e.g. 22 for a 24 GB card, leaving room for the CUDA context and
    fragmentation); None = balance compute only. Ignored when ``partition`` is given."""
    activation_checkpoint_interval: int = 0
    """Recompute decoder blocks in backward, in groups of this many (DeepSpeed's pipeline checkpointing,
    non-reentrant); 0 = off."""
    activation_checkpoint_blocks: list[int] | None = None
    """Or recompute only these decoder blocks (0-based; e.g. the early blocks of stage 0, which hold the most
    micro-batches in flight under 1F1B). Non-reentrant ``torch.utils.checkpoint``."""
    activation_offload: bool | list[int] = False
    """Keep the activations saved for backward in host memory (pinned on CUDA; ``torch.autograd.graph.save_on_cpu``
    around the stage's forward) instead of GPU memory: ``true`` on every stage, or a list of stage indices (stage 0
    holds the most micro-batches in flight under 1F1B). They come back to the GPU in backward; the losses are
    unchanged. Combinable with recomputation (then only what is still saved moves). Costs host-device copies."""
    inter_stage_mask: Literal["padding", "float_additive"] = "padding"
    """What stages send each other besides the hidden states: ``padding``, the ``[B, L]`` int64 padding mask (each
    block builds its causal mask from it), or ``float_additive``, a ``[B, 1, L, L]`` float additive causal + padding
    mask that takes part in autograd (the predecessors' layout; only for ``python -m lavis.bench --compare
    predecessor``)."""

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"train.parallel.num_stages must be >= 1 (got {self.num_stages})")
        if self.partition is not None and len(self.partition) != self.num_stages + 1:
            raise ValueError(f"train.parallel.partition {self.partition} must have num_stages + 1 = "
                             f"{self.num_stages + 1} boundaries")
        check_range(self.gpu_memory_gib is None or self.gpu_memory_gib > 0, "train.parallel.gpu_memory_gib",
                    "> 0 or null", self.gpu_memory_gib)
        check_range(self.activation_checkpoint_interval >= 0, "train.parallel.activation_checkpoint_interval",
                    ">= 0", self.activation_checkpoint_interval)
        if self.activation_checkpoint_interval and self.activation_checkpoint_blocks:
            raise ValueError("set train.parallel.activation_checkpoint_interval or "
                             "train.parallel.activation_checkpoint_blocks, not both")
        if isinstance(self.activation_offload, list):
            bad = [s for s in self.activation_offload if not 0 <= s < self.num_stages]
            if bad:
                raise ValueError(f"train.parallel.activation_offload: stages {bad} do not exist "
                                 f"(train.parallel.num_stages is {self.num_stages}: stages 0..{self.num_stages - 1})")


@dataclass
class CheckpointConfig:
    """``train.checkpoint``: when checkpoints are written and which are kept."""

    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted; the best one by ``save_best`` is kept besides)."""
    save_best: str | None = None
    """Keep the checkpoint with the best value of this metric (a key of the metrics row, e.g. ``eval_loss`` or
    ``eval_vqa_accuracy``) besides the last ``keep_last``; its tag is written to ``<output_dir>/best``. Only
    checkpoints saved at a step where the metric was computed compete (make ``save_every`` a multiple of
    ``train.eval.every``)."""
    save_best_mode: Literal["auto", "min", "max"] = "auto"
    """``auto``: lower is better for metrics whose name contains "loss", higher otherwise."""

    def __post_init__(self) -> None:
        check_range(self.save_every >= 0, "train.checkpoint.save_every", ">= 0 (0: save only at the end)",
                    self.save_every)
        if self.keep_last < 1:
            raise ValueError(f"train.checkpoint.keep_last must be >= 1 (got {self.keep_last})")


@dataclass
class LogConfig:
    """``train.log``: where the metrics of every step go besides ``<output_dir>/metrics.jsonl``."""

    tensorboard: bool = True
    """Write TensorBoard events to ``<output_dir>/tensorboard`` (rank 0)."""
    wandb_project: str | None = None
    """Also log to Weights & Biases under this project (needs ``pip install wandb``); None = off."""


@dataclass
class TrainConfig:
    """``train``: the run's own keys, and one section per concern (optim, batch, parallel, checkpoint, log, eval).

    The flat keys of earlier versions (``train.lr`` for ``train.optim.lr``, ...) are still read, with a warning
    naming the new key (``lavis.config.old_keys``)."""

    output_dir: str = "output/run"
    """The run directory: checkpoints, ``config.yaml``, metrics, logs."""
    seed: int = 42
    """Fixes the data order, augmentation and the random init (a function of it alone, whatever the layout)."""
    max_steps: int = 1000
    """Optimizer steps (one ``train_batch`` each)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision (DeepSpeed's bf16 / fp16 modes with fp32 master weights, or plain fp32)."""
    num_threads: int = 0
    """torch intra-op threads per rank (0 = leave torch's default). CPU runs set this to cores / ranks."""
    max_nonfinite_steps: int = 0
    """Steps with a non-finite loss or gradient norm that may be skipped (no weight update, logged with
    ``nonfinite: true``) before the run stops; 0 = stop at the first one."""
    allow_data_change: bool = False
    """Resume even though a training dataset's records changed since the checkpoint (record count or content
    fingerprint in its ``lavis_meta.json``); the data order from the resumed step on then differs from the
    original run's. Without it such a resume is refused."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and learning-rate schedule."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Micro-batch size and gradient accumulation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Pipeline stages, their boundaries and activation memory."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and rotation."""
    log: LogConfig = field(default_factory=LogConfig)
    """TensorBoard and Weights & Biases."""
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    """Held-out loss and benchmark scores during training (README "Evaluate")."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 (got {self.max_steps})")
        check_range(self.num_threads >= 0, "train.num_threads", ">= 0 (0: torch's default)", self.num_threads)
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"train.max_nonfinite_steps must be >= 0 (got {self.max_nonfinite_steps})")
        o = self.optim
        if o.optimizer == "adamw_bf16" and (self.precision != "bf16" or o.zero_stage != 0):
            raise ValueError(f"train.optim.optimizer: adamw_bf16 trains bf16 weights without fp32 master copies: it "
                             f"needs train.precision: bf16 (got {self.precision}) and train.optim.zero_stage: 0 (got "
                             f"{o.zero_stage}; ZeRO-1 would add fp32 master copies)")
        if self.checkpoint.save_best is not None and not self.eval.every:
            raise ValueError(f"train.checkpoint.save_best: {self.checkpoint.save_best} needs train.eval.every > 0 "
                             "(the metric comes from the held-out evaluation)")


TRAIN_SECTIONS: dict[str, type] = {"optim": OptimConfig, "batch": BatchConfig, "parallel": ParallelConfig,
                                   "checkpoint": CheckpointConfig, "log": LogConfig}
"""The sections of ``train`` that hold the flat keys of earlier versions (``lavis.config.old_keys``)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
