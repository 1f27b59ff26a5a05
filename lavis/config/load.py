"""Strict YAML -> :class:`~lavis.config.schema.Config`, overrides, and the derived DeepSpeed dict.

:func:`read_yaml` reads a config file as literals (``yaml.SafeLoader``: no Python tags, no anchors or aliases, and
any ``${...}`` interpolation refused): every YAML error is one line naming the file and line. OmegaConf only merges
``base:`` chains and applies ``--options key=value`` dot-list overrides, and is never asked to resolve anything. The
merged plain dict is converted into the dataclass tree by :func:`from_dict`, which rejects unknown keys (naming the
file, the full key and the closest valid key) and wrong types. Nothing else in the project reads config YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
import yaml.composer
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lavis.config.old_keys import upgrade_config, upgrade_option_key
from lavis.config.schema import Config, TrainConfig
from lavis.predecessors.keys import habit_hint

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


class _LiteralLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases: an alias bomb (``&a [*b, *b, ...]``) is refused before it
    expands, and a value means what it says where it is written."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a config file "
                                              "(anchors and aliases are refused): write the value out",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _yaml_error(source: str, e: yaml.YAMLError, lines: bool) -> ConfigError:
    """One line: ``FILE:LINE: what is wrong`` (PyYAML's own message spans several lines with a code excerpt)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None and lines else source
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    text = f"{context}: {problem}" if context and "constructor" not in problem else problem
    return ConfigError(f"{where}: invalid YAML: {' '.join(str(text).split())}")


def parse_yaml(text: str, source: str, lines: bool = True) -> Any:
    """Parse ``text`` as literal YAML (see :class:`_LiteralLoader`); errors are one line naming ``source`` (and the
    line when ``lines``)."""
    try:
        return yaml.load(text, Loader=_LiteralLoader)  # a SafeLoader subclass: no Python tags
    except yaml.YAMLError as e:
        raise _yaml_error(source, e, lines) from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain literals, with interpolation (``${...}``) refused naming the file and key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): a config file must be UTF-8 YAML") from None
    data = parse_yaml(text, str(path))
    refuse_interpolation(data, str(path))
    return data


def refuse_interpolation(value: Any, source: str, key: str = "") -> None:
    """Config values are literals: a string holding ``${`` (OmegaConf interpolation such as ``${oc.env:VAR}``) is
    refused, naming ``source`` and the key, so nothing is ever resolved from the environment or other keys."""
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_interpolation(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_interpolation(v, source, f"{key}[{i}]")
    elif isinstance(value, str) and "${" in value:
        raise ConfigError(f"{source}: `{key or '<root>'}`: {value!r} holds `${{...}}`: interpolation is not "
                          "supported, config values are literals (write the value itself)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` strictly, apply ``key=value`` overrides, return the tree.

    Keys are dotted paths (list items by index: ``data.train.0.ann_path=...``); values are parsed as YAML
    scalars/lists (``yaml.safe_load``, never evaluated as code).
    """
    source = str(path) if path is not None else "<defaults>"
    raw = OmegaConf.create({}) if path is None else _load_with_base(Path(path), ())
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad --options item {item!r}: expected key=value, e.g. train.optim.lr=1e-4")
        key = upgrade_option_key(key)  # an old flat train key (warned), or None: a removed one (warned)
        if key is None:
            continue
        refuse_predecessor_key(key)
        value = parse_yaml(text, f"bad --options item {item!r}", lines=False) if text else ""
        refuse_interpolation(value, "--options", key)
        try:
            OmegaConf.update(raw, key, value, merge=True)
        except (OmegaConfBaseException, IndexError, ValueError) as e:
            raise ConfigError(f"bad --options item {item!r}: {' '.join(str(e).split())}") from e
    if overrides:
        source += f" (with --options {' '.join(overrides)})"
    data = OmegaConf.to_container(raw, resolve=False)  # literals only: interpolation was refused on reading
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    return from_dict(Config, data, source=source)


def refuse_predecessor_key(key: str) -> None:
    """``--options run.init_lr=...`` typed by a predecessor's habit: say what the key is here."""
    if schema_has_key(Config, key):
        return
    hint = habit_hint(key)
    if hint is not None:
        raise ConfigError(f"--options {key}: not a key of ours; {hint}")


def schema_has_key(cls: type, key: str) -> bool:
    """Whether the dotted ``key`` names a field of the dataclass tree (list indices and free-form mappings pass)."""
    node: Any = cls
    for part in key.split("."):
        if part.isdigit() or not dataclasses.is_dataclass(node):
            continue
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = next((a for a in (hints[part], *_type_args(hints[part])) if dataclasses.is_dataclass(a)), None)
        if node is None:
            return True
    return True


def _type_args(tp: Any) -> tuple[Any, ...]:
    """The dataclasses inside ``X | None`` and ``list[X]``."""
    return tuple(b for a in typing.get_args(tp) for b in (a, *typing.get_args(a)))


def _load_with_base(path: Path, chain: tuple[Path, ...]) -> Any:
    """A recipe may start from another with ``base: other.yaml`` (relative to the recipe's own directory); its keys
    are merged over the base's, recursively (lists are replaced, not concatenated)."""
    if not path.is_file():
        via = f" (named by `base:` in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} not found{via}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `base:` chain loops: {' -> '.join(str(p) for p in (*chain, path.resolve()))}")
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    try:
        data = upgrade_config(data, str(path))  # each file of a `base:` chain by itself, before they merge
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    raw = OmegaConf.create(data)
    if isinstance(raw, DictConfig):
        refuse_predecessor_config(path, raw)
    if not isinstance(raw, DictConfig) or "base" not in raw:
        return raw
    base_ref = raw.pop("base")
    if not isinstance(base_ref, str):
        raise ConfigError(f"{path}: `base` must be a path string, got {base_ref!r}")
    base = _load_with_base(path.parent / base_ref, (*chain, path.resolve()))
    return OmegaConf.merge(base, raw)


PREDECESSOR_ARCHS = {
    "minigpt4qwen": "MPP-Qwen-Next / MiniGPT4Qwen",
    "minigpt4": "MiniGPT-4",
    "mini_gpt4": "MiniGPT-4",
    "minigpt_v2": "MiniGPT-v2",
}
"""``model.arch`` of the predecessors' LAVIS-style configs -> the project's name."""


def predecessor_kind(raw: Any) -> str | None:
    """The predecessor a config comes from when it has their LAVIS key structure (top-level ``run:`` or
    ``datasets:``, or ``model.arch``), else None. The one place every tool (training, inspect, the data checker,
    chat) recognises a predecessor's YAML, through :func:`load_config`."""
    if not isinstance(raw, (dict, DictConfig)):
        return None
    model = raw.get("model")
    arch = model.get("arch") if isinstance(model, (dict, DictConfig)) else None
    if arch is None and "run" not in raw and "datasets" not in raw:
        return None
    run = raw.get("run")
    if arch in PREDECESSOR_ARCHS:
        return PREDECESSOR_ARCHS[arch]
    if isinstance(run, (dict, DictConfig)) and "deepspeed_config" in run:
        return PREDECESSOR_ARCHS["minigpt4qwen"]
    return f"LAVIS-style (model.arch: {arch})" if arch else "LAVIS-style"


def migrate_command(path: str | Path) -> str:
    p = Path(path)
    return f"python -m lavis.config.migrate {p} -o {p.stem}_migrated.yaml"


def refuse_predecessor_config(path: Path, raw: Any) -> None:
    """A predecessor's YAML is not ours: say what it is and the command that translates it."""
    kind = predecessor_kind(raw)
    if kind is None:
        return
    model = raw.get("model")
    has_arch = isinstance(model, (dict, DictConfig)) and "arch" in model
    keys = (["model.arch"] if has_arch else []) + [k for k in ("datasets", "run") if k in raw]
    raise ConfigError(f"{path} is a {kind} config ({', '.join(f'`{k}`' for k in keys)}), not one of ours; "
                      f"translate it with: {migrate_command(path)}")


def from_dict(cls: type, data: Any, *, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, recursively; every key must be a field of the dataclass. A whole
    :class:`Config` (a run's saved config too) has its old flat ``train`` keys read by their new names, quietly
    (files and ``--options`` were warned about on loading)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or '<root>'}` must be a mapping, got {data!r}")
    if cls is Config:
        try:
            data = upgrade_config(data, source, warn=False)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; valid keys: {', '.join(names)}"
            habit = habit_hint(f"{prefix}{key}") if isinstance(key, str) else None
            hint = f"; {habit}" if habit else hint
            raise ConfigError(f"{source}: unknown key `{prefix}{key}`{hint}")
        kwargs[key] = _convert(hints[key], value, source=source, key=f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or '<root>'}`: {e}") from e
    except ValueError as e:  # __post_init__ validation
        raise ConfigError(f"{source}: {e}") from e


def _convert(tp: Any, value: Any, *, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: `{key}` must be {expected}, got {value!r}")

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad(" or ".join(_name(a) for a in args))
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1 and dataclasses.is_dataclass(non_none[0]):  # a section or null: name the bad key inside
            return _convert(non_none[0], value, source=source, key=key)
        for a in non_none:
            try:
                return _convert(a, value, source=source, key=key)
            except ConfigError:
                continue  # try the next member; the error below names them all
        raise bad(" or ".join(_name(a) for a in args))
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise bad(f"one of {list(args)}")
    if origin is list:
        if not isinstance(value, list):
            raise bad(f"a list of {_name(args[0])}")
        return [_convert(args[0], v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_convert(a, v, source=source, key=f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise TypeError(f"unsupported config type {tp!r} for `{key}`")  # a schema bug, not a user error


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def with_values(node: T, values: dict[str, Any]) -> T:
    """A copy of the dataclass tree ``node`` with the dotted keys of ``values`` set (``{"train.max_steps": 5,
    "train.parallel.num_stages": 2}``). Keys of one section are set together, and every section on the way is
    validated again (its ``__post_init__``)."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    deeper = {head: with_values(getattr(node, head), sub) for head, sub in nested.items()}
    return dataclasses.replace(node, **direct, **deeper)  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass tree as plain containers (tuples become lists so YAML/JSON round-trip)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write atomically (a temporary file, then ``os.replace``): a crash never leaves a half-written config."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), str(tmp))
    os.replace(tmp, path)


def optimizer_clips(train: TrainConfig) -> bool:
    """Who clips gradients: True when our optimizer clips with the all-stage norm (``engine.optim``), False when
    DeepSpeed does. The one owner of this rule (the trainer and :func:`deepspeed_config` ask it).

    DeepSpeed's own gradient clipping is used only where it computes the global norm correctly under PP
    (bf16 / ZeRO-1). In plain fp32 without ZeRO it counts only stage 0's gradients (docs/PIPELINE.md section 6),
    so there our optimizer clips instead. The same holds for ``train.optim.optimizer: adamw_bf16``: the trainer casts
    the module to bf16 itself and DeepSpeed gets no ``bf16`` section, so it steps our optimizer directly instead of
    wrapping it with fp32 master weights.
    """
    return (train.precision == "fp32" or train.optim.optimizer == "adamw_bf16") and train.optim.zero_stage == 0


def deepspeed_config(train: TrainConfig, dp_world_size: int) -> dict[str, Any]:
    """Derive the DeepSpeed dict from ``train``. The optimizer and scheduler are built by us, not by DeepSpeed;
    DeepSpeed clips gradients only where :func:`optimizer_clips` says our optimizer does not."""
    ds_clips = not optimizer_clips(train)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch.micro_batch_size,
        "gradient_accumulation_steps": train.batch.grad_accum_steps,
        "train_batch_size": train.batch.micro_batch_size * train.batch.grad_accum_steps * dp_world_size,
        "gradient_clipping": train.optim.grad_clip if ds_clips else 0.0,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": train.optim.zero_stage},
        "zero_allow_untested_optimizer": True,
        "pipeline": {"use_reentrant": False},
    }
    if train.optim.offload_optimizer:
        import torch

        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        cfg["zero_force_ds_cpu_optimizer"] = False  # our AdamW steps the CPU-resident fp32 state
    if train.precision == "bf16" and train.optim.optimizer != "adamw_bf16":  # adamw_bf16: we cast, no fp32 masters
        cfg["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg
