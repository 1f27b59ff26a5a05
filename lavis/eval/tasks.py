"""The benchmark tasks by name: how each reads its files, its default prompt and its scorer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lavis.eval import caption, gqa, mcq, videoqa, vqa, yesno
from lavis.eval.common import Prompt, Sample, check_unique_ids


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Prompt
    max_new_tokens: int
    """Default answer length (replies are short except captions)."""
    score: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
    headline: tuple[str, ...]
    """The summary's main number (printed first; ``train.checkpoint.save_best``): the first of these keys the scores
    have."""

    def main_metric(self, scores: dict[str, Any]) -> str:
        return next(k for k in self.headline if k in scores)


TASKS: dict[str, Task] = {
    "vqa": Task("vqa", vqa.PROMPT, 16, vqa.score, ("accuracy",)),
    "mcq": Task("mcq", mcq.PROMPT, 16, mcq.score, ("accuracy",)),
    "yesno": Task("yesno", yesno.PROMPT, 16, yesno.score, ("f1", "perception")),
    "caption": Task("caption", caption.PROMPT, 40, caption.score, ("cider",)),
    "video-qa": Task("video-qa", videoqa.PROMPT, 16, videoqa.score, ("contains",)),
    "gqa": Task("gqa", gqa.PROMPT, 16, gqa.score, ("accuracy",)),
    "vizwiz": Task("vizwiz", vqa.VIZWIZ_PROMPT, 16, vqa.score, ("accuracy",)),
    "okvqa": Task("okvqa", vqa.OKVQA_PROMPT, 16, vqa.score, ("accuracy",)),
}


@dataclass(frozen=True)
class Source:
    """Where a benchmark's files are (``--data``, ``--images``, ``--annotations``, ``--split``)."""

    data: Path
    images: Path | None = None
    annotations: Path | None = None
    split: str | None = None


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def load_samples(task: Task, src: Source, work: Path, prompt: Prompt) -> tuple[list[Sample], dict[str, Any]]:
    """The benchmark's samples (prompt applied) and notes on the file's format for the summary; a file that repeats
    a question id is refused, naming both places."""
    samples, notes = _read_samples(task, src, work, prompt)
    check_unique_ids(samples)
    return samples, notes


def _read_samples(task: Task, src: Source, work: Path, prompt: Prompt) -> tuple[list[Sample], dict[str, Any]]:
    if task.name == "vqa":
        return vqa.load(src.data, src.images, src.annotations, prompt), {}
    if task.name == "mcq":
        return mcq.load(src.data, src.images, work, prompt, src.split)
    if task.name == "yesno":
        return yesno.load(src.data, src.images, prompt)
    if task.name == "caption":
        return caption.load(src.data, src.images, prompt), {}
    if task.name == "gqa":
        return gqa.load(src.data, src.images, prompt), {}
    if task.name == "vizwiz":
        return vqa.load_vizwiz(src.data, src.images, prompt), {}
    if task.name == "okvqa":
        return vqa.load_okvqa(src.data, src.images, src.annotations, prompt), {}
    return videoqa.load(src.data, src.images, prompt), {}
