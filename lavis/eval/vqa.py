"""VQA accuracy as the official VQAv2 evaluator computes it (also used by OK-VQA and TextVQA).

Answers are normalised the way the official ``vqaEval.py`` does: newlines/tabs become spaces, punctuation is removed
or spaced (a period between digits is kept), number words become digits, articles are dropped and common
contractions missing their apostrophe are restored. A prediction's accuracy is, for each of the ten subsets that
leave one human answer out, ``min(#remaining humans that gave it / 3, 1)``, averaged over the subsets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavis.eval.common import BenchmarkFileError, Prompt, Sample, fmt, index_unique, media_path, need, read_json

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, typo included: it strips every such period
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, 32)  # the official call passes re.UNICODE (32) as the count


def process_digits_articles(text: str) -> str:
    words: list[str] = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official normalisation of a prediction: whitespace, punctuation, then number words/articles/contractions
    (lower-cased)."""
    return process_digits_articles(process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official per-question accuracy in [0, 1] of ``prediction`` against the (usually ten) human answers.

    As the official evaluator: the prediction is always fully normalised; the human answers (already lower-case
    in the released files) only get the punctuation step, and only when they are not all identical."""
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    gts = [_clean(a) for a in human_answers]
    pred = normalize_answer(prediction)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        matches = sum(1 for a in others if a == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# --- the benchmark files ---------------------------------------------------------------------------------------------
PROMPT = Prompt("{question}\nAnswer the question using a single word or phrase.", "vqa-v1")


def load(data: Path, images: Path | None, annotations: Path | None, prompt: Prompt) -> list[Sample]:
    """VQAv2 / OK-VQA (a questions file ``{"data_subtype", "questions": [...]}`` plus ``annotations`` with ten
    ``answers`` per question; images ``COCO_<data_subtype>_<image_id:012d>.jpg``) or TextVQA (one file
    ``{"data": [{"question_id", "image_id", "question", "answers": [...]}]}``; images ``<image_id>.jpg``)."""
    doc = read_json(data)
    if isinstance(doc, dict) and "questions" in doc:
        return _load_vqav2(data, doc, images, annotations, prompt)
    if isinstance(doc, dict) and "data" in doc:
        return _load_textvqa(data, doc, images, prompt)
    raise BenchmarkFileError(f"{data}: neither a VQAv2/OK-VQA questions file (key 'questions') nor a TextVQA file "
                             f"(key 'data'); VizWiz's val.json is --task vizwiz, GQA's questions --task gqa")


def _load_vqav2(data: Path, doc: dict[str, Any], images: Path | None, annotations: Path | None,
                prompt: Prompt, default_subtype: str | None = None) -> list[Sample]:
    if annotations is None:
        raise BenchmarkFileError(f"{data} is a VQAv2/OK-VQA questions file: pass its answers with --annotations "
                                 f"(e.g. v2_mscoco_val2014_annotations.json)")
    subtype = doc.get("data_subtype", default_subtype) if default_subtype else need(doc, "data_subtype", str(data))
    ann_doc = read_json(annotations)
    answers = index_unique(need(ann_doc, "annotations", str(annotations)), "question_id",
                           f"{annotations} annotations")
    out = []
    for i, q in enumerate(doc["questions"]):
        where = f"{data} questions[{i}]"
        qid = need(q, "question_id", where)
        if qid not in answers:
            raise BenchmarkFileError(f"{where}: question_id {qid} has no entry in {annotations}")
        a = answers[qid]
        humans = [need(x, "answer", f"{annotations} question_id {qid}") for x in need(a, "answers", str(annotations))]
        image = media_path(images, f"COCO_{subtype}_{int(need(q, 'image_id', where)):012d}.jpg", where)
        out.append(Sample(str(qid), fmt(prompt.template, where, question=need(q, "question", where)), [image],
                          gold={"answers": humans, "answer_type": a.get("answer_type", "all")}, where=where))
    return out


def _load_textvqa(data: Path, doc: dict[str, Any], images: Path | None, prompt: Prompt) -> list[Sample]:
    out = []
    for i, q in enumerate(doc["data"]):
        where = f"{data} data[{i}]"
        image = media_path(images, f"{need(q, 'image_id', where)}.jpg", where)
        out.append(Sample(str(need(q, "question_id", where)),
                          fmt(prompt.template, where, question=need(q, "question", where)), [image],
                          gold={"answers": list(need(q, "answers", where)),
                                "answer_type": q.get("answer_type", "all")}, where=where))
    return out


OKVQA_PROMPT = Prompt(PROMPT.template, "okvqa-v1")


def load_okvqa(data: Path, images: Path | None, annotations: Path | None, prompt: Prompt) -> list[Sample]:
    """OK-VQA as released: ``OpenEnded_mscoco_val2014_questions.json`` (``{"questions": [{"image_id", "question",
    "question_id"}]}``) and ``--annotations mscoco_val2014_annotations.json`` (``{"annotations": [{"question_id",
    "answers": [{"answer", "raw_answer", ...}] * 10, "answer_type", "question_type"}]}``; the official evaluation
    scores the processed ``answer``); images COCO val2014 ``COCO_val2014_<image_id:012d>.jpg``. Scored with the VQA
    accuracy (:func:`vqa_accuracy`)."""
    doc = read_json(data)
    if not isinstance(doc, dict) or "questions" not in doc:
        raise BenchmarkFileError(f"{data}: not an OK-VQA questions file (key 'questions', as "
                                 f"OpenEnded_mscoco_val2014_questions.json)")
    return _load_vqav2(data, doc, images, annotations, prompt, default_subtype="val2014")


VIZWIZ_PROMPT = Prompt("{question}\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
                       "Answer the question using a single word or phrase.", "vizwiz-v1")


def load_vizwiz(data: Path, images: Path | None, prompt: Prompt) -> list[Sample]:
    """VizWiz-VQA as released (``Annotations/val.json``): a list of ``{"image", "question", "answers": [{"answer",
    "answer_confidence"}] * 10, "answerable", "answer_type"}``; ``image`` (e.g. ``VizWiz_val_00000000.jpg``, one
    question per image, so it is the sample's id) under ``--images`` (the release's ``val/``). Scored with the VQA
    accuracy (:func:`vqa_accuracy`, the VizWiz evaluation's rule), per answer type too (``unanswerable`` is one)."""
    doc = read_json(data)
    if not isinstance(doc, list):
        raise BenchmarkFileError(f"{data}: a VizWiz annotations file is a list of {{\"image\", \"question\", "
                                 f"\"answers\"}} records (as Annotations/val.json)")
    out = []
    for i, q in enumerate(doc):
        where = f"{data} [{i}]"
        name = need(q, "image", where)
        humans = [need(a, "answer", f"{where} answers") for a in need(q, "answers", where)]
        if not humans:
            raise BenchmarkFileError(f"{where}: no human answers")
        out.append(Sample(str(name), fmt(prompt.template, where, question=need(q, "question", where)),
                          [media_path(images, name, where)],
                          gold={"answers": humans, "answer_type": q.get("answer_type", "all"),
                                "answerable": q.get("answerable")}, where=where))
    return out


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``accuracy`` (mean official VQA accuracy, in [0, 1]) and per ``answer_type`` accuracies."""
    per_type: dict[str, list[float]] = {}
    accs = []
    for r in rows:
        acc = vqa_accuracy(r["prediction"], r["gold"]["answers"])
        accs.append(acc)
        per_type.setdefault(r["gold"].get("answer_type", "all"), []).append(acc)
    out: dict[str, Any] = {"accuracy": sum(accs) / len(accs) if accs else 0.0, "count": len(accs)}
    if len(per_type) > 1:
        out["by_answer_type"] = {k: sum(v) / len(v) for k, v in sorted(per_type.items())}
    return out
