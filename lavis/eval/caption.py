"""COCO-style captioning: BLEU-4 and CIDEr(-D) with pycocoevalcap's scorers.

Captions are tokenised by pycocoevalcap's PTB tokenizer (Stanford CoreNLP, needs ``java`` on PATH) as the COCO
caption evaluation does; without java a simple Python tokenisation stands in (lower-case, the same punctuation
removed) and the summary says ``"tokenizer": "python"`` — scores are then close to, not identical with, the official
ones. METEOR and SPICE are not computed (they need java and large model downloads).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavis.eval.common import BenchmarkFileError, Prompt, Sample, fmt, media_path, need, read_json

PROMPT = Prompt("A short image caption:", "caption-v1")
# The punctuation pycocoevalcap's PTBTokenizer drops after tokenising.
_PUNCT = re.compile(r"''|'|``|`|-LRB-|-RRB-|-LCB-|-RCB-|\.|\?|!|,|:|-|--|\.\.\.|;")


def load(data: Path, images: Path | None, prompt: Prompt) -> list[Sample]:
    """A COCO captions file: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``; one
    sample per image, its references all captions of that image."""
    doc = read_json(data)
    refs: dict[Any, list[str]] = {}
    for i, a in enumerate(need(doc, "annotations", str(data))):
        refs.setdefault(need(a, "image_id", f"{data} annotations[{i}]"), []).append(
            need(a, "caption", f"{data} annotations[{i}]"))
    out = []
    for i, im in enumerate(need(doc, "images", str(data))):
        where = f"{data} images[{i}]"
        iid = need(im, "id", where)
        if iid not in refs:
            raise BenchmarkFileError(f"{where}: image id {iid} has no caption in 'annotations'")
        out.append(Sample(str(iid), fmt(prompt.template, where), [media_path(images, need(im, "file_name", where),
                                                                             where)], gold={"references": refs[iid]},
                          where=where))
    return out


def _python_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {}
    for k, caps in captions.items():
        toks = []
        for c in caps:
            words = re.findall(r"[\w']+|[^\w\s]", c.lower())
            toks.append(" ".join(w for w in words if not _PUNCT.fullmatch(w)))
        out[k] = toks
    return out


def tokenize(captions: dict[str, list[str]]) -> tuple[dict[str, list[str]], str]:
    if shutil.which("java") is None:
        return _python_tokenize(captions), "python"
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}), "ptb"


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("the caption task scores with pycocoevalcap: pip install -e '.[eval]'") from e

    if not rows:
        return {"bleu4": 0.0, "cider": 0.0, "count": 0}
    gts, tok_name = tokenize({r["id"]: r["gold"]["references"] for r in rows})
    res, _ = tokenize({r["id"]: [r["prediction"]] for r in rows})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "count": len(rows), "tokenizer": tok_name}
