"""Stage plan: pure functions, no torch modules built, no DeepSpeed.

The layer table (which pipeline layer holds which plain-model weights) is part of the model's description and lives
in ``lavis.model.spec``; its names are re-exported here for the pipeline's users. The stage plan turns per-layer
cost estimates into contiguous stage boundaries that minimise the slowest stage, subject to an optional per-GPU
memory limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lavis.config.schema import Config, ModelConfig, TrainConfig
from lavis.data.cache_features import cache_level
from lavis.model.spec import LLM_DIMS as LLM_DIMS  # re-exported: the pipeline's users import them from here
from lavis.model.spec import LayerEntry, LayerKind
from lavis.model.spec import layer_of_plain_key as layer_of_plain_key
from lavis.model.spec import layer_table as layer_table

# --- cost model -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    index: int
    kind: LayerKind
    params: int
    trainable_params: int
    flops: float
    """Estimated forward + backward FLOPs per micro-batch."""
    act_bytes: float
    """Activation bytes kept for backward per micro-batch in flight."""
    weight_bytes: float | None = None
    """Bytes of this layer's weights on the GPU when not ``params x Workload.param_bytes`` (quantized blocks)."""


@dataclass(frozen=True)
class Workload:
    """What one micro-batch looks like, for the estimates."""

    tokens: int
    """Tokens per micro-batch (batch x sequence length)."""
    seq_len: int
    images: int
    """Images (frames) per micro-batch."""
    param_bytes: int = 2
    """Bytes per weight (2 for bf16/fp16, 4 for fp32)."""
    activation_checkpointing: bool = False
    """Every decoder block recomputed in backward (keeps only its input)."""
    checkpointed_blocks: frozenset[int] = frozenset()
    """Or only these decoder blocks."""
    offloaded_stages: frozenset[int] = frozenset()
    """Stages whose saved activations live in host memory (``train.parallel.activation_offload``)."""


def layer_costs(
    cfg: ModelConfig, hf_dims: dict[str, int], work: Workload, cached: str | None = None
) -> list[LayerCost]:
    """Per-layer parameter counts (exact for the standard layouts) and FLOP / activation estimates.

    ``hf_dims``: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    vocab_size. FLOPs: 2 x params x tokens forward (+ 4 x L^2 x D attention per sequence for blocks); backward is 2x
    forward for trainable layers, 1x (input gradients only) for frozen layers that gradients must pass through,
    0 for frozen layers with nothing trainable before them. ``cached`` (``"qformer"`` or ``"vision"``, see
    ``lavis.data.cache_features``): those frozen modules are read from a feature cache, so layer 0 neither holds
    nor runs them.
    """
    v, q = cfg.vision, cfg.qformer
    d, inter = hf_dims["hidden_size"], hf_dims["intermediate_size"]
    n_blocks, heads = hf_dims["num_hidden_layers"], hf_dims["num_attention_heads"]
    kv_heads, vocab = hf_dims.get("num_key_value_heads", heads), hf_dims["vocab_size"]
    head_dim = d // heads

    num_patches = (v.image_size // v.patch_size) ** 2
    vit_block = 4 * v.width * v.width + 2 * v.width * v.mlp_hidden + 8 * v.width + v.mlp_hidden
    vit = v.depth * vit_block + 3 * v.patch_size**2 * v.width + (num_patches + 3) * v.width
    ln_vision = 2 * v.width
    n_cross = len(range(0, q.num_layers, q.cross_attention_freq))
    qf_layer = 4 * q.hidden_size**2 + 2 * q.hidden_size * q.intermediate_size + 9 * q.hidden_size + q.intermediate_size
    qf_cross = 2 * q.hidden_size**2 + 2 * q.hidden_size * v.width + 6 * q.hidden_size
    qformer = q.num_layers * qf_layer + n_cross * qf_cross + 2 * q.hidden_size + q.num_query_tokens * q.hidden_size
    qformer *= q.enabled  # no Q-Former: patch tokens go straight into the projection
    pin, n_img_tok = cfg.projection_in_dim, cfg.num_image_tokens
    proj = pin * d + d if cfg.projection.kind == "linear" else pin * d + d * d + 2 * d
    embed = vocab * d
    block = d * (heads * head_dim) * 2 + d * (kv_heads * head_dim) * 2 + 3 * d * inter + 2 * d
    block += (heads + 2 * kv_heads) * head_dim  # q/k/v biases (Qwen); an over-estimate of a few KB for LLaMA
    head = vocab * d

    vis_tr = 0 if v.frozen else vit + ln_vision
    qf_tr = 0 if q.frozen else qformer
    proj_tr = 0 if cfg.projection.frozen else proj
    llm_tr = not cfg.llm.frozen
    lora = cfg.llm.lora
    adapters = lora_params_per_block(cfg, hf_dims)
    emb_tr = llm_tr or (lora is not None and lora.train_embeddings)
    upstream_trains = bool(vis_tr or qf_tr or proj_tr or llm_tr or lora is not None)
    block_weight_bytes = None
    if cfg.llm.quantize is not None:  # linear weights quantized; norms, biases and adapters at param_bytes
        linear = block - 2 * d - (heads + 2 * kv_heads) * head_dim
        block_weight_bytes = linear * QUANT_BYTES[cfg.llm.quantize] + (block - linear + adapters) * work.param_bytes

    def bwd_factor(trainable: bool) -> float:
        return 2.0 if trainable else (1.0 if upstream_trains else 0.0)

    t, img = work.tokens, work.images
    vit_f = 2 * vit * (num_patches + 1) * img * (1 + bwd_factor(bool(vis_tr)))
    qf_f = 2 * qformer * n_img_tok * img * (1 + bwd_factor(bool(qf_tr)))
    proj_f = 2 * proj * n_img_tok * img * (1 + bwd_factor(bool(proj_tr)))
    if cached is not None:  # the cached modules are not built: no weights, no compute
        vit = ln_vision = vit_f = 0
        if cached == "qformer":
            qformer = qf_f = 0
    seqs = max(1, t // max(1, work.seq_len))
    block_f = (2 * block * t + 4 * seqs * work.seq_len**2 * d) * (1 + bwd_factor(llm_tr))
    head_f = 2 * head * t * (1 + bwd_factor(llm_tr))
    def act_per_token(j: int) -> int:
        return 2 * d if work.activation_checkpointing or j in work.checkpointed_blocks else 16 * d + 2 * inter

    costs = [
        LayerCost(
            0, "embed", vit + ln_vision + qformer + proj + embed,
            vis_tr + qf_tr + proj_tr + (embed if emb_tr else 0),
            vit_f + qf_f + proj_f,
            float(t * d * 2 + (img * n_img_tok * pin * 32 if (qf_tr or proj_tr) else 0)),
        )
    ]
    for j in range(n_blocks):
        costs.append(
            LayerCost(1 + j, "block", block + adapters, block if llm_tr else adapters, block_f,
                      float(t * act_per_token(j) * 2), block_weight_bytes)
        )
    costs.append(LayerCost(1 + n_blocks, "norm", d, d if llm_tr else 0, 4.0 * t * d, float(t * d * 2)))
    costs.append(LayerCost(2 + n_blocks, "head", head, head if emb_tr else 0, head_f, float(t * vocab * 6)))
    return costs


QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0 + 4 / 4096}
"""GPU bytes per quantized weight: NF4 packs two weights a byte plus an fp32 scale per 64 (before bitsandbytes'
optional double quantization shrinks the scales); int8 one byte plus an fp32 scale per row (a 4096-wide row here)."""


def block_linear_shapes(hf_dims: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of a decoder block, by its transformers name."""
    d, inter = hf_dims["hidden_size"], hf_dims["intermediate_size"]
    heads = hf_dims["num_attention_heads"]
    kv = hf_dims.get("num_key_value_heads", heads) * (d // heads)
    q = heads * (d // heads)
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, inter),
            "up_proj": (d, inter), "down_proj": (inter, d)}


def lora_params_per_block(cfg: ModelConfig, hf_dims: dict[str, int]) -> int:
    """Adapter parameters of one decoder block: ``r x (in + out)`` per targeted linear layer (0 without LoRA)."""
    lora = cfg.llm.lora
    if lora is None:
        return 0
    shapes = block_linear_shapes(hf_dims)
    names = list(shapes) if isinstance(lora.targets, str) else lora.targets
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"model.llm.lora.targets {unknown} match no linear layer of a decoder block; valid names: "
                         f"{sorted(shapes)} (or 'all-linear')")
    return sum(lora.r * (shapes[n][0] + shapes[n][1]) for n in names)


OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "paged_adamw8bit": 2.0, "adamw_bf16": 8.0}
"""``train.optim.optimizer`` -> bytes of Adam's two moments per trainable parameter (blockwise 8-bit: one byte each; its
per-block scales, 4 bytes per 2,048 values, are left out; ``adamw_bf16``: first moment bf16 2, second moment fp32
4, Kahan compensation bf16 2)."""

NO_MASTER_COPY = frozenset({"adamw_bf16"})
"""Optimizers that step the bf16 weights themselves: no fp32 master weight and gradient buffer."""


def optimizer_bytes_per_param(precision: str, zero_stage: int, offload: bool, dp: int,
                              optimizer: str = "adamw") -> float:
    """GPU bytes per trainable parameter beyond its weight and gradient (``Workload.param_bytes`` each).

    The moments (:data:`OPTIMIZER_STATE_BYTES`: 8 for AdamW, 2 for 8-bit AdamW, 8 for ``adamw_bf16`` with its
    compensation); in bf16/fp16 DeepSpeed's BF16/FP16 optimizers add an fp32 master weight and an fp32 gradient
    buffer (8), except under ``adamw_bf16`` (:data:`NO_MASTER_COPY`). ZeRO-1 shards that state over the ``dp``
    replicas; offload moves it to host RAM (0 on the GPU).
    """
    if offload:
        return 0.0
    masters = 0.0 if precision == "fp32" or optimizer in NO_MASTER_COPY else 8.0
    per = OPTIMIZER_STATE_BYTES[optimizer] + masters
    return per / dp if zero_stage >= 1 else per


def stage_memory_bytes(
    costs: list[LayerCost], stage: int, num_stages: int, work: Workload, optim_bytes: float
) -> float:
    """Weights + grads + optimizer state of the layers, plus activations of the micro-batches in flight (1F1B); an
    offloaded stage (``Workload.offloaded_stages``) keeps those of the one micro-batch it computes (the rest are in
    host memory)."""
    weights = sum(c.params * work.param_bytes if c.weight_bytes is None else c.weight_bytes for c in costs)
    grads = sum(c.trainable_params for c in costs) * work.param_bytes
    optim = sum(c.trainable_params for c in costs) * optim_bytes
    in_flight = 1 if stage in work.offloaded_stages else num_stages - stage
    return weights + grads + optim + in_flight * sum(c.act_bytes for c in costs)


def plan_stages(
    costs: list[LayerCost],
    num_stages: int,
    work: Workload,
    *,
    memory_limit_bytes: float | None = None,
    optim_bytes: float = 12,
) -> list[int]:
    """Contiguous boundaries ``[0, b1, ..., n]`` minimising the slowest stage's FLOPs within the memory limit.

    Exact dynamic programme over split points (n layers, S stages: O(S n^2)). Raises ValueError when there are
    fewer layers than stages or no split fits the memory limit.
    """
    n = len(costs)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1 (got {num_stages})")
    if num_stages > n:
        raise ValueError(f"{num_stages} stages but only {n} layers: reduce --num-stages to at most {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c.flops)

    def fits(stage: int, lo: int, hi: int) -> bool:
        if memory_limit_bytes is None:
            return True
        return stage_memory_bytes(costs[lo:hi], stage, num_stages, work, optim_bytes) <= memory_limit_bytes

    inf = float("inf")
    # best[s][i]: minimal max-stage cost placing layers [0, i) on stages [0, s); back[s][i]: the split point.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    back = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                if best[s - 1][j] == inf or not fits(s - 1, j, i):
                    continue
                # Tie-break towards earlier splits' balance: prefer the smaller max, then the larger last stage start.
                cand = max(best[s - 1][j], prefix[i] - prefix[j])
                if cand < best[s][i] or (cand == best[s][i] and j > back[s][i]):
                    best[s][i], back[s][i] = cand, j
    if best[num_stages][n] == inf:
        assert memory_limit_bytes is not None  # without a limit every split fits
        raise ValueError(
            f"no split of {n} layers into {num_stages} stages fits {memory_limit_bytes / 2**30:.1f} GiB per GPU: "
            "use more stages, activation checkpointing, or a smaller micro-batch"
        )
    bounds = [n]
    i = n
    for s in range(num_stages, 0, -1):
        i = back[s][i]
        bounds.append(i)
    return bounds[::-1]


def check_partition(parts: list[int], num_layers: int, num_stages: int) -> list[int]:
    """Validate a user ``--partition``: strictly increasing from 0 to ``num_layers`` with one entry per boundary."""
    if (
        len(parts) != num_stages + 1
        or parts[0] != 0
        or parts[-1] != num_layers
        or any(b <= a for a, b in zip(parts, parts[1:]))
    ):
        raise ValueError(
            f"partition {parts} is invalid: need {num_stages + 1} strictly increasing boundaries from 0 to "
            f"{num_layers} (layers: 0 = vision+embed, 1..{num_layers - 3} = decoder blocks, "
            f"{num_layers - 2} = norm, {num_layers - 1} = head)"
        )
    return parts


def format_plan(
    parts: list[int], costs: list[LayerCost], work: Workload, optim_bytes: float = 12,
    peak_tflops: float | None = None,
) -> str:
    """A table of the plan: layers, parameters, trainable parameters, estimated memory, estimated TFLOP per
    micro-batch (forward + backward) and compute share; with ``peak_tflops`` (a known GPU) also the time per
    micro-batch at that peak, a lower bound."""
    total = sum(c.flops for c in costs) or 1.0
    num_stages = len(parts) - 1
    head = (f"{'stage':>5} {'layers':>9} {'params':>14} {'trainable':>14} {'est.mem GiB':>11} {'TFLOP/mb':>9} "
            f"{'share':>6}")
    rows = [head + (f" {'ms/mb@peak':>10}" if peak_tflops else "")]
    for s in range(num_stages):
        sl = costs[parts[s]:parts[s + 1]]
        kinds = f"{parts[s]}-{parts[s + 1] - 1}"
        mem = stage_memory_bytes(sl, s, num_stages, work, optim_bytes) / 2**30
        flops = sum(c.flops for c in sl)
        row = (f"{s:>5} {kinds:>9} {sum(c.params for c in sl):>14,} {sum(c.trainable_params for c in sl):>14,} "
               f"{mem:>11.2f} {flops / 1e12:>9.3f} {flops / total:>6.1%}")
        if peak_tflops:
            row += f" {flops / (peak_tflops * 1e12) * 1e3:>10.1f}"
        rows.append(row)
    return "\n".join(rows)


def offloaded_stages(t: TrainConfig) -> frozenset[int]:
    """The stages whose saved activations go to host memory (``train.parallel.activation_offload``: true = all)."""
    if t.parallel.activation_offload is True:
        return frozenset(range(t.parallel.num_stages))
    return frozenset(t.parallel.activation_offload or ())


def checkpoint_blocks(t: TrainConfig, num_blocks: int) -> frozenset[int]:
    """``train.parallel.activation_checkpoint_blocks`` validated against the model's block count."""
    blocks = frozenset(t.parallel.activation_checkpoint_blocks or ())
    bad = sorted(b for b in blocks if not 0 <= b < num_blocks)
    if bad:
        raise ValueError(f"train.parallel.activation_checkpoint_blocks {bad}: the LLM has blocks 0..{num_blocks - 1}")
    return blocks


@dataclass(frozen=True)
class StagePlan:
    parts: list[int]
    costs: list[LayerCost]
    work: Workload
    optim_bytes: float


def plan_for_config(cfg: Config, dims: dict[str, int], dp: int,
                    costs: Callable[[Workload], list[LayerCost]] | None = None) -> StagePlan:
    """The run's plan: ``train.parallel.partition`` if given (validated), else :func:`plan_stages` within
    ``train.parallel.gpu_memory_gib``; the workload is one micro-batch of ``data.max_txt_len`` tokens and one image per
    sample. ``costs``: the model family's per-layer estimates for a workload (``lavis.families.plan``);
    by default the BLIP-2-style model's :func:`layer_costs`."""
    t = cfg.train
    work = Workload(tokens=t.batch.micro_batch_size * cfg.data.max_txt_len, seq_len=cfg.data.max_txt_len,
                    images=t.batch.micro_batch_size, param_bytes=4 if t.precision == "fp32" else 2,
                    activation_checkpointing=t.parallel.activation_checkpoint_interval > 0,
                    checkpointed_blocks=checkpoint_blocks(t, dims["num_hidden_layers"]),
                    offloaded_stages=offloaded_stages(t))
    if costs is None:
        cached = None
        if cfg.data.feature_cache is not None:
            cached = cache_level(cfg.model)
        layer_list = layer_costs(cfg.model, dims, work, cached)
    else:
        layer_list = costs(work)
    return stage_plan(t, layer_list, work, dp)


def stage_plan(t: TrainConfig, costs: list[LayerCost], work: Workload, dp: int) -> StagePlan:
    """Stage boundaries for ``costs`` (any model family's layers): ``train.parallel.partition`` if given
    (validated), else :func:`plan_stages` within ``train.parallel.gpu_memory_gib``."""
    o = t.optim
    optim_bytes = optimizer_bytes_per_param(t.precision, o.zero_stage, o.offload_optimizer, dp, o.optimizer)
    if t.parallel.partition is not None:
        parts = check_partition(list(t.parallel.partition), len(costs), t.parallel.num_stages)
    else:
        limit = None if t.parallel.gpu_memory_gib is None else t.parallel.gpu_memory_gib * 2**30
        parts = plan_stages(costs, t.parallel.num_stages, work, memory_limit_bytes=limit, optim_bytes=optim_bytes)
    return StagePlan(parts, costs, work, optim_bytes)


def layers_to_plain(table: list[LayerEntry], layer_states: dict[int, dict]) -> dict:
    """Per-layer state dicts (``{layer_index: {local_key: tensor}}``) -> one plain-model state dict."""
    out = {}
    for idx, sd in layer_states.items():
        for k, v in sd.items():
            plain = table[idx].to_plain(k)
            if plain in out:
                raise KeyError(f"two layers map to {plain!r}")
            out[plain] = v
    return out
