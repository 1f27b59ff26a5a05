"""Yes/no benchmarks: POPE (JSON lines) and MME (its release directory), each scored by its own rule.

POPE reads a reply as "no" when its first sentence has the word "no", "No" or "not", else "yes" (the POPE
evaluation script's rule), and reports accuracy, precision, recall and F1 of "yes" and the yes-ratio. MME reads a
lower-cased reply as "yes"/"no" when it is exactly that or its first four characters contain it, else "other"
(always wrong); per category, ``acc`` is the percentage of questions right and ``acc_plus`` the percentage of images
whose two questions are both right; a category's score is ``acc + acc_plus``, perception and cognition sum theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavis.eval.common import BenchmarkFileError, Prompt, Sample, fmt, media_path, need, read_jsonl

PROMPT = Prompt("{question}", "yesno-v1")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def pope_label(reply: str) -> str:
    text = reply
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def mme_label(reply: str) -> str:
    text = reply.lower().strip()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


# --- files -----------------------------------------------------------------------------------------------------------
def _load_pope(data: Path, images: Path | None, prompt: Prompt) -> list[Sample]:
    out = []
    for i, r in enumerate(read_jsonl(data)):
        where = f"{data} record {i + 1}"
        label = str(need(r, "label", where)).strip().lower()
        if label not in ("yes", "no"):
            raise BenchmarkFileError(f"{where}: label {label!r} is not yes/no")
        out.append(Sample(str(need(r, "question_id", where)),
                          fmt(prompt.template, where, question=need(r, "text", where)),
                          [media_path(images, need(r, "image", where), where)], gold={"label": label}, where=where))
    return out


def _mme_pairs(cat_dir: Path) -> list[tuple[Path, Path]]:
    """(question file, image) pairs of one MME category, in either of the release's two layouts."""
    qa_dir = cat_dir / "questions_answers_YN"
    img_dir = cat_dir / "images"
    txts = sorted((qa_dir if qa_dir.is_dir() else cat_dir).glob("*.txt"))
    pairs = []
    for txt in txts:
        base = img_dir if img_dir.is_dir() else cat_dir
        image = next((base / (txt.stem + s) for s in IMAGE_SUFFIXES if (base / (txt.stem + s)).is_file()), None)
        if image is None:
            raise BenchmarkFileError(f"{txt}: no image {txt.stem}.jpg/.png in {base}")
        pairs.append((txt, image))
    return pairs


def _load_mme(root: Path, prompt: Prompt) -> list[Sample]:
    out = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for txt, image in _mme_pairs(cat_dir):
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for j, line in enumerate(lines):
                where = f"{txt} line {j + 1}"
                if line.count("\t") != 1:
                    raise BenchmarkFileError(f"{where}: expected 'question<TAB>Yes|No'")
                question, answer = (s.strip() for s in line.split("\t"))
                if answer.lower() not in ("yes", "no"):
                    raise BenchmarkFileError(f"{where}: answer {answer!r} is not Yes/No")
                out.append(Sample(f"{cat_dir.name}/{image.name}/{j}", fmt(prompt.template, where, question=question),
                                  [str(image)], gold={"label": answer.lower(), "category": cat_dir.name,
                                                      "image": image.name}, where=where))
    if not out:
        raise BenchmarkFileError(f"{root}: no MME category directories with question files")
    return out


def load(data: Path, images: Path | None, prompt: Prompt) -> tuple[list[Sample], dict[str, Any]]:
    """A directory is MME's release (one directory per category); a file is POPE's JSON lines
    (``{"question_id", "image", "text", "label"}``)."""
    if data.is_dir():
        return _load_mme(data, prompt), {"format": "mme"}
    return _load_pope(data, images, prompt), {"format": "pope"}


# --- scores ----------------------------------------------------------------------------------------------------------
def score_pope(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tp = fp = tn = fn = 0
    for r in rows:
        pred, gold = pope_label(r["prediction"]), r["gold"]["label"]
        tp += pred == "yes" and gold == "yes"
        fp += pred == "yes" and gold == "no"
        tn += pred == "no" and gold == "no"
        fn += pred == "no" and gold == "yes"
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "count": n}


def score_mme(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    cats: dict[str, dict[str, list[bool]]] = {}
    for r in rows:
        g = r["gold"]
        ok = mme_label(r["prediction"]) == g["label"]
        cats.setdefault(g["category"], {}).setdefault(g["image"], []).append(ok)
    per: dict[str, dict[str, float]] = {}
    for cat, imgs in sorted(cats.items()):
        answers = [ok for v in imgs.values() for ok in v]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(v) for v in imgs.values()) / len(imgs)
        per[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    out: dict[str, Any] = {
        "perception": sum(v["score"] for k, v in per.items() if k in MME_PERCEPTION),
        "cognition": sum(v["score"] for k, v in per.items() if k in MME_COGNITION),
        "count": len(rows), "by_category": per,
    }
    other = sorted(set(per) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if other:
        out["other_categories"] = sum(per[k]["score"] for k in other)
    return out


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if rows and "category" in rows[0]["gold"]:
        return score_mme(rows)
    return score_pope(rows)
