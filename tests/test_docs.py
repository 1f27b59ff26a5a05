"""The docs stay true: the folder table of docs/ARCHITECTURE.md matches the files on disk, and every config key the
docs name (`train.*`, `data.*`, `model.*`) exists in the schema."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from lavis.config.schema import Config
from lavis.predecessors.keys import TABLES, rule_for

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "DATA.md", REPO / "WEIGHT.md", *sorted((REPO / "docs").glob("*.md"))]
# `train.optim.lr`, `data.train.0.ann_path`, `data.train[].weight`; not `lavis.data.check`, `x/model.pth`, `train.py`
KEY = re.compile(r"(?<![\w./-])((?:model|data|train)(?:\.(?:[A-Za-z_]\w*|\d+)|\[\])+)")
FILE_SUFFIXES = {"py", "pth", "json", "jsonl", "yaml", "yml", "md", "tar", "tsv", "txt", "log", "safetensors"}
# transformers' weight names (`model.layers.N.*`), not config keys
WEIGHT_PREFIXES = ("model.layers", "model.embed_tokens", "model.norm", "model.rotary_emb", "model.lm_head",
                   "model.visual", "model.language_model")


def _unwrap(tp: object) -> object:
    """`X | None` -> X; `list[X]` stays a list (indices are walked separately)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        dcs = [a for a in args if dataclasses.is_dataclass(a)]
        return dcs[0] if dcs else tp
    return tp


def key_exists(dotted: str) -> bool:
    tp: object = Config
    for part in dotted.replace("[]", ".0").split("."):
        tp = _unwrap(tp)
        if typing.get_origin(tp) is list:
            if not part.isdigit():
                return False
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) is dict or tp is typing.Any:
            return True  # free-form (model.llm.hf_config.*)
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return True


def doc_keys() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in KEY.finditer(line):
                key = m.group(1)
                if key.rsplit(".", 1)[-1] in FILE_SUFFIXES or key.startswith(WEIGHT_PREFIXES):
                    continue
                if predecessor_key(key):
                    continue
                found.append((doc.relative_to(REPO).as_posix(), n, key))
    return found


def predecessor_key(key: str) -> bool:
    """The docs also name the predecessors' keys (`model.arch`, `model.max_txt_len`, mostly in MIGRATING.md): those in
    the table migrate uses (lavis/predecessors/keys.py) are theirs, not ours."""
    return any(rule_for(family, key) is not None for family in TABLES) or key == "model.arch"


def test_every_config_key_named_in_the_docs_exists_in_the_schema():
    keys = doc_keys()
    assert len(keys) > 50, "the pattern found almost no keys: it is broken"
    missing = [f"{doc}:{line}: {key}" for doc, line, key in keys if not key_exists(key)]
    assert not missing, "docs name config keys the schema does not have:\n" + "\n".join(missing)


def test_the_key_check_refuses_a_key_that_does_not_exist():
    assert key_exists("train.optim.lr") and key_exists("data.train.0.ann_path") and key_exists("data.train[].weight")
    assert key_exists("model.llm.hf_config.num_hidden_layers") and key_exists("model.llm.lora.r")
    assert not key_exists("train.log_every_n") and not key_exists("data.train.ann_path")


def folder_table() -> dict[str, str]:
    """`lavis/x/` -> the text of its row in docs/ARCHITECTURE.md's "Folders and what each owns" table."""
    text = (REPO / "docs/ARCHITECTURE.md").read_text()
    section = text.split("## Folders and what each owns", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(lavis/[\w/]+/)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def modules_on_disk(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.py") if p.stem != "__init__" and p.stem != "__main__"}


def test_architecture_folder_table_matches_the_files_on_disk():
    rows = folder_table()
    assert rows, "docs/ARCHITECTURE.md has no folder table"
    folders = {f"{p.relative_to(REPO).as_posix()}/" for p in (REPO / "lavis").iterdir()
               if p.is_dir() and p.name != "__pycache__"}
    assert set(rows) == folders, f"table rows {sorted(set(rows) ^ folders)} differ from the folders on disk"
    problems = []
    for folder, row in rows.items():
        named = set(re.findall(r"`(\w+)\.py`", row))
        on_disk = modules_on_disk(REPO / folder)
        problems += [f"{folder}{m}.py is not in the table" for m in sorted(on_disk - named)]
        problems += [f"{folder}: the table names {m}.py, which does not exist"
                     for m in sorted(named - on_disk)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_in_the_docs_resolve(doc: Path):
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        if not (doc.parent / target).exists():
            broken.append(target)
    assert not broken, f"{doc.name} links to missing files: {broken}"
