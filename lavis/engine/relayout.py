"""Resume on another layout (P stages x D replicas) keeping every parameter's optimizer state.

A parameter's name in a pipeline stage is ``<global layer index>.<path inside the layer>`` (DeepSpeed registers each
layer under its global index), so it is the same whatever stage holds the layer: that name is the key of the
re-mapping. The checkpoint's own files are re-mapped when a run resumes on another layout; nothing extra is written
at save time except the parameter names of each stage's optimizer groups (``lavis_meta.json``
``optimizer_params``), which DeepSpeed does not record for an unpartitioned optimizer.

- **Unpartitioned optimizer** (``train.optim.zero_stage: 0``: adamw, adamw8bit, paged_adamw8bit, adamw_bf16). Stage S's
  state is ``mp_rank_SS_model_states.pt`` ``optimizer``: torch's format, one entry per parameter by position.
  :func:`states_by_name` names each entry with ``optimizer_params``; :func:`state_dict_for` builds the new stage's
  state dict, which the optimizer's own ``load_state_dict`` loads. Each entry is moved whole, never converted:
  bitsandbytes quantizes each parameter's moments blockwise within that parameter (``state1``/``state2`` uint8,
  ``absmax``, ``qmap``), so moving a parameter carries its 8-bit state bit for bit; adamw_bf16's Kahan
  compensation (``comp``) and fp32 second moment move the same way.
- **Partitioned optimizer** (ZeRO-1, and DeepSpeed's bf16 optimizer): stage S's replica d holds a flat fp32
  partition of each group (master weights and moments) in ``[bf16_]zero_pp_rank_d_mp_rank_SS_optim_states.pt``,
  with ``param_slice_mappings`` (name -> where its fragment lies in that partition). :func:`gather_partitions`
  joins each parameter's fragments over the old replicas into a full tensor; :func:`fill_partition` cuts the new
  replica's partition out of them, at the places DeepSpeed's own fragment mapping of the new layout names.
  Quantized moments under ZeRO are refused (their blocks span parameters: no exact re-split).

The LR scheduler state, DeepSpeed's step counters and the data position are layout-independent and load as
before; the global batch (``micro_batch_size x grad_accum_steps x D``) is kept by
:func:`lavis.engine.run_dir.resume_grad_accum`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lavis.engine import ds_compat
from lavis.engine.safe_load import safe_torch_load

NAMES_KEY = "optimizer_params"
"""``lavis_meta.json``: ``{"<stage>": [[parameter name, ...] per optimizer group]}``."""
MASTER_KEY = "fp32_master"
"""In a gathered partitioned state: the parameter's fp32 master copy (beside the base optimizer's keys)."""
_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")


class RelayoutError(ValueError):
    """The checkpoint's optimizer state cannot be carried to this layout; the message says why and what to do."""


def describe(parts: Sequence[int], dp: int) -> str:
    """``2 stages x 1 replica``."""
    p = len(parts) - 1
    return f"{p} stage{'s' if p != 1 else ''} x {dp} replica{'s' if dp != 1 else ''}"


# --- what each stage's optimizer holds, by name -----------------------------------------------------------------


def param_names(module: torch.nn.Module, optimizer: Any) -> list[list[str]]:
    """This stage's optimizer groups as parameter names (layout-independent; see the module docstring)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group] for group in ds_compat.model_param_groups(optimizer)]


def gather_names(engine: Any) -> dict[str, list[list[str]]]:
    """Collective (every rank): each stage's optimizer groups as names, for ``lavis_meta.json`` ``optimizer_params``."""
    mine = (engine.stage_id, param_names(engine.module, engine.optimizer))
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    return {str(stage): names for stage, names in sorted(rows, key=lambda r: r[0])}


# --- unpartitioned optimizers: whole per-parameter entries -------------------------------------------------------


def states_by_name(state_dict: Mapping[str, Any], groups: Sequence[Sequence[str]], where: str) -> dict[str, Any]:
    """torch-format optimizer ``state_dict`` -> ``{parameter name: its state entry}`` (entries untouched). ``groups``:
    the names of each param group in order (``optimizer_params``); ``where`` names the file in errors."""
    saved = state_dict["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g) for g in groups]:
        raise RelayoutError(f"{where}: its optimizer groups hold {[len(g['params']) for g in saved]} parameters but "
                            f"lavis_meta.json {NAMES_KEY} names {[len(g) for g in groups]}; the checkpoint is "
                            "inconsistent: resume it on its own layout")
    out = {}
    for group, names in zip(saved, groups):
        for index, name in zip(group["params"], names):
            if index in state_dict["state"]:  # a parameter that never got a gradient has no state yet
                out[name] = state_dict["state"][index]
    return out


def state_dict_for(template: Mapping[str, Any], groups: Sequence[Sequence[str]], states: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """The state dict that gives this optimizer (``template``: its own ``state_dict()``, whose param groups and LRs
    stay) the saved entry of each of its parameters (``groups``: their names)."""
    missing = [n for g in groups for n in g if n not in states]
    if missing and len(missing) < sum(map(len, groups)):  # some stepped, some not: not the same training state
        raise RelayoutError(f"the checkpoint holds no optimizer state for {len(missing)} trained parameter(s) of this "
                            f"stage (first: {missing[0]}); resume it on its own layout")
    state = {}
    for group, names in zip(template["param_groups"], groups):
        for index, name in zip(group["params"], names):
            if name in states:
                state[index] = states[name]
    return {"state": state, "param_groups": template["param_groups"]}


# --- partitioned optimizers: fragments of flat partitions --------------------------------------------------------


def _split_state(state: Mapping[str, Any], where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A partition's base optimizer state -> (its flat moments, its scalars such as the step); anything else (a
    quantized or nested state) is refused: it cannot be cut at parameter boundaries exactly."""
    sizes = {v.numel() for v in state.values() if torch.is_tensor(v) and v.ndim == 1}
    flats, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.ndim == 1 and value.is_floating_point() and len(sizes) == 1:
            flats[key] = value
        elif (torch.is_tensor(value) and value.ndim == 0) or isinstance(value, (int, float)):
            scalars[key] = value
        else:
            kind = f"{value.dtype} tensor" if torch.is_tensor(value) else type(value).__name__
            raise RelayoutError(
                f"{where}: the partitioned optimizer state holds {key!r} ({kind}), which cannot be re-split at "
                "parameter boundaries exactly (8-bit moments under ZeRO are quantized in blocks that span "
                "parameters); resume on the checkpoint's layout")
    return flats, scalars


def gather_partitions(partitions: Sequence[Mapping[str, Any]], where: str = "checkpoint"
                      ) -> dict[str, dict[str, Any]]:
    """One stage's ZeRO/bf16 optimizer states, replica 0 first (each the ``optimizer_state_dict`` of a
    ``*zero_pp_rank_d_*`` file) -> ``{name: {key: full flat tensor or scalar}}``: the base optimizer's moments and
    :data:`MASTER_KEY`, each joined from the parameter's fragments in replica order (a parameter is contiguous in
    the flat group, so its pieces in successive partitions follow each other); scalars (the step) as they are."""
    out: dict[str, dict[str, Any]] = {}
    for part in partitions:
        base = part["base_optimizer_state"]["state"]
        for g, mapping in enumerate(part["param_slice_mappings"]):
            flats, scalars = _split_state(base.get(g, {}), where)
            flats = {MASTER_KEY: part["single_partition_of_fp32_groups"][g], **flats}
            for name, frag in mapping.items():
                entry = out.setdefault(name, {})
                for key, flat in flats.items():
                    piece = flat.narrow(0, frag.start, frag.numel)
                    entry[key] = piece.clone() if key not in entry else torch.cat([entry[key], piece])
                for key, value in scalars.items():
                    entry.setdefault(key, value)
    return out


def fill_partition(flat: torch.Tensor, state: dict[str, Any], fragments: Iterable[tuple[str, int, int, int]],
                   saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Write the saved full tensors into this replica's partition ``flat`` (fp32 masters) and its base optimizer
    ``state`` (moments; created as zeros where the optimizer has not stepped yet). ``fragments``: ``(name, start in
    the parameter, start in the partition, numel)`` for each parameter with a piece in this partition."""
    fragments = list(fragments)
    for name, lp_start, hp_start, numel in fragments:
        if name not in saved:
            raise RelayoutError(f"the checkpoint holds no optimizer state for {name}; resume it on its own layout")
        entry = saved[name]
        for key, value in entry.items():
            if key == MASTER_KEY:
                target = flat
            elif torch.is_tensor(value) and value.ndim == 1:
                if key not in state or state[key].shape != flat.shape:
                    state[key] = torch.zeros_like(flat, dtype=value.dtype)
                target = state[key]
            else:
                state.setdefault(key, value.clone() if torch.is_tensor(value) else value)
                continue
            if lp_start + numel > value.numel():
                raise RelayoutError(f"{name}: the checkpoint's {key} has {value.numel()} values, this layout needs "
                                    f"{lp_start + numel}: not the same parameter; resume on the checkpoint's layout")
            target.narrow(0, hp_start, numel).copy_(value.narrow(0, lp_start, numel))


def _fragments(optimizer: Any, names: Mapping[int, str], group: int) -> list[tuple[str, int, int, int]]:
    """This replica's pieces of group ``group`` from DeepSpeed's own fragment mapping of the new layout."""
    pieces = [(names[id(p)], ds_compat.hp_fragment(p)) for p in ds_compat.model_param_groups(optimizer)[group]]
    return [(name, *where) for name, where in pieces if where is not None]


# --- reading the checkpoint and loading this rank's share --------------------------------------------------------


def overlapping_stages(old_parts: Sequence[int], start: int, stop: int) -> list[int]:
    """The old stages that held any of layers ``start`` to ``stop - 1``."""
    return [s for s in range(len(old_parts) - 1) if old_parts[s] < stop and start < old_parts[s + 1]]


def zero_files(tag_dir: Path, stage: int) -> list[Path]:
    """Stage ``stage``'s partitioned optimizer files, replica 0 first (empty for an unpartitioned optimizer)."""
    found = []
    for f in tag_dir.iterdir():
        m = _ZERO_FILE.match(f.name)
        if m and int(m.group(2)) == stage:
            found.append((int(m.group(1)), f))
    return [f for _, f in sorted(found)]


def can_remap(tag_dir: Path, meta: Mapping[str, Any]) -> bool:
    """False for a checkpoint of an unpartitioned optimizer written before ``optimizer_params`` existed: nothing
    names its per-position state."""
    return NAMES_KEY in meta or bool(zero_files(tag_dir, 0))


def read_stage(tag_dir: Path, stage: int, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Old stage ``stage``'s optimizer state by parameter name."""
    files = zero_files(tag_dir, stage)
    if files:
        return gather_partitions([safe_torch_load(str(f), map_location="cpu")["optimizer_state_dict"] for f in files],
                                 str(files[0].parent / f"*_mp_rank_{stage:02d}_optim_states.pt"))
    f = tag_dir / f"mp_rank_{stage:02d}_model_states.pt"
    names = (meta.get(NAMES_KEY) or {}).get(str(stage))
    if names is None:
        raise RelayoutError(f"{tag_dir / 'lavis_meta.json'} does not name the parameters of stage {stage}'s optimizer "
                            f"({NAMES_KEY}; written by an older version)")
    state_dict = safe_torch_load(str(f), map_location="cpu")["optimizer"]
    if state_dict is None:
        raise RelayoutError(f"{f} holds no optimizer state")
    return states_by_name(state_dict, names, str(f))


def load_remapped(engine: Any, tag_dir: Path, meta: Mapping[str, Any], start: int, stop: int) -> int:
    """Give this rank's optimizer (``engine.optimizer``; its stage holds layers ``start`` to ``stop - 1``) the
    checkpoint's state of each of its parameters. Returns how many parameters got a state."""
    saved: dict[str, Any] = {}
    for stage in overlapping_stages(meta["parts"], start, stop):
        saved.update(read_stage(tag_dir, stage, meta))
    optimizer = engine.optimizer
    if ds_compat.is_partitioned(optimizer):
        names = {id(p): n for n, p in engine.module.named_parameters()}
        count = 0
        for g, flat in enumerate(ds_compat.flat_partitions(optimizer)):
            fragments = _fragments(optimizer, names, g)
            fill_partition(flat.data, ds_compat.base_optimizer_state(optimizer, flat), fragments, saved)
            count += len(fragments)
        return count
    groups = param_names(engine.module, optimizer)
    state_dict = state_dict_for(optimizer.state_dict(), groups, saved)
    optimizer.load_state_dict(state_dict)
    return len(state_dict["state"])
