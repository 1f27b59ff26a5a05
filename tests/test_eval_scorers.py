"""Each benchmark scorer against hand-computed scores on small files written in the benchmark's released layout."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lavis.eval import caption, gqa, mcq, videoqa, vqa, yesno
from lavis.eval.common import BenchmarkFileError
from lavis.eval.tasks import Source, get_task, load_samples


def rows_for(samples, predictions: dict[str, str]) -> list[dict]:
    return [{"id": s.id, "query": s.query, "media": s.media, "prediction": predictions[s.id], "gold": s.gold}
            for s in samples]


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def touch_images(d: Path, names: list[str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        (d / n).write_bytes(png_bytes())


# --- VQA --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,norm", [
    ("Two.", "2"), ("An apple", "apple"), ("dont", "don't"), ("yes!", "yes"), ("3,000", "3000"),
    ("The red, cat.", "red cat"), ("ten\tdogs\n", "10 dogs"), ("3.5", "3.5"), ("black-and-white", "black and white"),
])
def test_vqa_normalisation(raw: str, norm: str) -> None:
    assert vqa.normalize_answer(raw) == norm


def test_vqa_accuracy_leave_one_out_by_hand() -> None:
    # 3 humans said "2", 7 said "two" (human answers only get the punctuation step, so "two" stays "two"):
    # leaving a "2" out (3 subsets) leaves 2 matches -> 2/3; leaving a "two" out (7 subsets) leaves 3 -> 1.
    assert vqa.vqa_accuracy("Two", ["2"] * 3 + ["two"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa.vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa.vqa_accuracy("A cat.", ["cat"] * 10) == 1.0
    assert vqa.vqa_accuracy("dog", ["cat"] * 10) == 0.0


def test_vqav2_files_and_score(tmp_path: Path) -> None:
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "How many?", "question_id": 420},
        {"image_id": 7, "question": "What animal?", "question_id": 70},
    ]}))
    def ans(xs: list[str]) -> list[dict]:
        return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(xs)]

    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "number", "answers": ans(["2"] * 3 + ["two"] * 7)},
        {"question_id": 70, "image_id": 7, "answer_type": "other", "answers": ans(["cat"] * 2 + ["dog"] * 8)},
    ]}))
    touch_images(tmp_path / "img", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg"])
    with pytest.raises(BenchmarkFileError, match="--annotations"):
        vqa.load(tmp_path / "q.json", tmp_path / "img", None, vqa.PROMPT)
    samples = vqa.load(tmp_path / "q.json", tmp_path / "img", tmp_path / "a.json", vqa.PROMPT)
    assert [s.id for s in samples] == ["420", "70"]
    assert samples[0].media[0].endswith("COCO_val2014_000000000042.jpg")
    assert samples[0].query.startswith("How many?\n")
    scores = vqa.score(rows_for(samples, {"420": "two", "70": "cat"}))
    assert scores["accuracy"] == pytest.approx((0.9 + 0.6) / 2)
    assert scores["by_answer_type"] == pytest.approx({"number": 0.9, "other": 0.6})


def test_textvqa_file_and_missing_image(tmp_path: Path) -> None:
    doc = {"dataset_name": "textvqa", "data": [{"question_id": 1, "image_id": "abc", "question": "Brand?",
                                                "answers": ["nike"] * 10}]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(BenchmarkFileError, match="abc.jpg not found"):
        vqa.load(tmp_path / "t.json", tmp_path, None, vqa.PROMPT)
    touch_images(tmp_path, ["abc.jpg"])
    samples = vqa.load(tmp_path / "t.json", tmp_path, None, vqa.PROMPT)
    assert vqa.score(rows_for(samples, {"1": "Nike."}))["accuracy"] == 1.0


# --- MCQ --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("(C)", "C"), ("B. a cat", "B"), ("The answer is C.", "C"), ("Answer: B", "B"),
    ("A red circle", "B"), ("I think it is a dog", "A"), ("no idea", None), ("A", "A"),
])
def test_extract_choice(reply: str, letter: str | None) -> None:
    assert mcq.extract_choice(reply, {"A": "dog", "B": "red circle", "C": "fish"}) == letter


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]


def write_tsv(path: Path, rows: list[dict]) -> None:
    lines = ["\t".join(MMB_COLUMNS)] + ["\t".join(str(r.get(c, "")) for c in MMB_COLUMNS) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_mmbench_circular_one_rotation_fails(tmp_path: Path) -> None:
    img = base64.b64encode(png_bytes()).decode()
    base0 = {"question": "Which colour?", "hint": "nan", "category": "colour", "image": img, "split": "dev"}
    base1 = {"question": "Which shape?", "hint": "A drawing.", "category": "shape", "image": img, "split": "dev"}
    write_tsv(tmp_path / "mmb.tsv", [  # the released dev file holds the rotated copies (index + k * 1e6)
        {**base0, "index": 0, "A": "red", "B": "blue", "C": "green", "answer": "A"},
        {**base0, "index": 1000000, "A": "blue", "B": "green", "C": "red", "answer": "C"},
        {**base0, "index": 2000000, "A": "green", "B": "red", "C": "blue", "answer": "B"},
        {**base1, "index": 1, "A": "circle", "B": "square", "answer": "B"},
        {**base1, "index": 1000001, "A": "square", "B": "circle", "answer": "A", "image": "1"},  # the row's index
    ])
    samples, notes = mcq.load(tmp_path / "mmb.tsv", None, tmp_path / "work", mcq.PROMPT)
    assert notes["rotations"] == "from the file" and len(samples) == 5
    assert samples[3].query == "A drawing.\nWhich shape?\nA. circle\nB. square\nAnswer with the option's letter " \
                               "from the given choices directly."
    assert Path(samples[0].media[0]).read_bytes() == png_bytes() and samples[4].media == samples[3].media
    preds = {"0": "A", "1000000": "C.", "2000000": "(B)", "1": "B", "1000001": "B"}  # the last rotation is wrong
    scores = mcq.score(rows_for(samples, preds))
    assert scores["accuracy"] == 0.5 and scores["single_pass_accuracy"] == 1.0 and scores["questions"] == 2
    assert scores["by_category"] == {"colour": 1.0, "shape": 0.0}


def test_mmbench_rotations_generated_when_file_has_originals_only(tmp_path: Path) -> None:
    img = base64.b64encode(png_bytes()).decode()
    write_tsv(tmp_path / "mmb.tsv", [{"index": 5, "question": "Q?", "A": "x", "B": "y", "C": "z", "answer": "B",
                                      "category": "c", "image": img}])
    samples, notes = mcq.load(tmp_path / "mmb.tsv", None, tmp_path / "work", mcq.PROMPT)
    assert notes["rotations"] == "generated here"
    assert [(s.id, s.gold["answer"], s.gold["options"]["A"]) for s in samples] == [
        ("5", "B", "x"), ("1000005", "A", "y"), ("2000005", "C", "z")]


def test_scienceqa_img(tmp_path: Path) -> None:
    problems = {"11": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "",
                       "image": "image.png", "split": "test", "subject": "natural science"},
                "12": {"question": "No picture", "choices": ["a", "b"], "answer": 0, "image": None, "split": "test"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    touch_images(tmp_path / "images", ["test/11/image.png"])
    samples, _ = mcq.load(tmp_path / "problems.json", tmp_path / "images", tmp_path / "w", mcq.PROMPT, "test")
    assert [s.id for s in samples] == ["11"]
    assert mcq.score(rows_for(samples, {"11": "B"}))["accuracy"] == 1.0


# --- yes/no -----------------------------------------------------------------------------------------------------------
def test_pope_metrics_by_hand(tmp_path: Path) -> None:
    recs = [{"question_id": i, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a thing {i}?",
             "label": lab} for i, lab in enumerate(["yes", "yes", "yes", "no", "no", "no"])]
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    touch_images(tmp_path, ["COCO_val2014_000000000001.jpg"])
    samples, notes = yesno.load(tmp_path / "coco_pope_random.json", tmp_path, yesno.PROMPT)
    assert notes["format"] == "pope"
    preds = ["Yes, there is.", "No.", "yes", "Yes.", "There is not a dog. Yes.", "Yes"]
    scores = yesno.score(rows_for(samples, {str(i): p for i, p in enumerate(preds)}))
    # tp=2 fn=1 fp=2 tn=1
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["yes_ratio"] == pytest.approx(4 / 6)


def test_mme_accuracy_plus_by_hand(tmp_path: Path) -> None:
    root = tmp_path / "MME_Benchmark_release_version"
    ex = root / "existence"  # layout 1: images and question files side by side
    touch_images(ex, ["a.jpg", "b.png"])
    (ex / "a.txt").write_text("Is there a cat? Please answer yes or no.\tYes\nIs there a dog? Please answer yes or no."
                              "\tNo\n")
    (ex / "b.txt").write_text("Is there a car?\tYes\nIs there a bus?\tNo\n")
    art = root / "artwork"  # layout 2: images/ and questions_answers_YN/
    touch_images(art / "images", ["10.jpg"])
    (art / "questions_answers_YN").mkdir()
    (art / "questions_answers_YN" / "10.txt").write_text("Is this by Monet?\tYes\nIs this by Dali?\tNo\n")
    code = root / "code_reasoning"
    touch_images(code, ["0001.png"])
    (code / "0001.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    samples, notes = yesno.load(root, None, yesno.PROMPT)
    assert notes["format"] == "mme" and len(samples) == 8
    preds = {"existence/a.jpg/0": "Yes", "existence/a.jpg/1": "no, there is none",
             "existence/b.png/0": "Yes.", "existence/b.png/1": "Yes",  # wrong: image b fails accuracy+
             "artwork/10.jpg/0": "yes", "artwork/10.jpg/1": "No",
             "code_reasoning/0001.png/0": "I am not sure", "code_reasoning/0001.png/1": "no"}  # "other" is wrong
    scores = yesno.score(rows_for(samples, preds))
    cat = scores["by_category"]
    assert cat["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert cat["artwork"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0}
    assert cat["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert scores["perception"] == 325.0 and scores["cognition"] == 50.0


def test_mme_bad_line_names_file(tmp_path: Path) -> None:
    d = tmp_path / "mme" / "color"
    touch_images(d, ["x.jpg"])
    (d / "x.txt").write_text("Is it red? Yes\n")
    with pytest.raises(BenchmarkFileError, match=r"x.txt line 1: expected 'question<TAB>Yes\|No'"):
        yesno.load(tmp_path / "mme", None, yesno.PROMPT)


# --- caption and video QA ---------------------------------------------------------------------------------------------
@pytest.mark.process
def test_coco_caption_bleu4_by_hand(tmp_path: Path) -> None:
    doc = {"images": [{"id": 1, "file_name": "1.jpg"}],
           "annotations": [{"image_id": 1, "id": 9, "caption": "A red circle on white."}]}
    (tmp_path / "captions_test.json").write_text(json.dumps(doc))
    touch_images(tmp_path, ["1.jpg"])
    samples = caption.load(tmp_path / "captions_test.json", tmp_path, caption.PROMPT)
    scores = caption.score(rows_for(samples, {"1": "a red circle on black"}))
    # 1..4-gram precisions 4/5, 3/4, 2/3, 1/2, same length (no brevity penalty)
    assert scores["bleu4"] == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25, rel=1e-6)
    assert caption.score(rows_for(samples, {"1": "A red circle on white"}))["bleu4"] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.process
def test_coco_caption_cider_ranks_and_python_tokenizer(tmp_path: Path) -> None:
    refs = {"1": ["a red circle on white", "red circle"], "2": ["a blue square", "a small blue square"],
            "3": ["a green triangle", "green triangle on white"]}
    def rows(preds: dict[str, str]) -> list[dict]:
        return [{"id": k, "prediction": preds[k], "gold": {"references": v}} for k, v in refs.items()]

    good = caption.score(rows({"1": "a red circle", "2": "a blue square", "3": "a green triangle"}))
    bad = caption.score(rows({"1": "a blue square", "2": "a green triangle", "3": "a red circle"}))
    assert good["cider"] > 1.0 > bad["cider"]
    assert caption._python_tokenize({"x": ["A red, circle."]}) == {"x": ["a red circle"]}


def test_video_qa_exact_and_contains(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "1.mp4").write_bytes(b"\0")
    recs = [{"id": "q1", "video": "1.mp4", "question": "What moves?", "answer": "red circle"},
            {"question_id": 2, "video": "1.mp4", "question": "Where?", "answer": "left"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    samples = videoqa.load(tmp_path / "qa.jsonl", tmp_path / "v", videoqa.PROMPT)
    assert samples[0].video and [s.id for s in samples] == ["q1", "2"]
    scores = videoqa.score(rows_for(samples, {"q1": "A red circle moves left.", "2": "Left"}))
    assert scores["exact"] == 0.5 and scores["contains"] == 1.0


# --- GQA, VizWiz, OK-VQA (as released) -------------------------------------------------------------------------------
def score_task(name: str, src: Source, tmp_path: Path, predictions: dict[str, str]) -> dict:
    """Read the files through the registered task (as ``python -m lavis.eval --task NAME`` does) and score."""
    task = get_task(name)
    samples, _ = load_samples(task, src, tmp_path, task.prompt)
    return task.score(rows_for(samples, predictions))


def test_gqa_testdev_balanced_exact_match_by_hand(tmp_path: Path) -> None:
    def q(image: str, question: str, answer: str, structural: str, semantic: str) -> dict:
        return {"imageId": image, "question": question, "answer": answer, "fullAnswer": f"It is {answer}.",
                "isBalanced": True, "types": {"structural": structural, "semantic": semantic, "detailed": "x"},
                "semantic": [], "entailed": [], "equivalent": [], "groups": {"global": None, "local": "x"},
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}}, "semanticStr": "x"}
    doc = {"201307251": q("n161313", "Is it overcast?", "no", "verify", "attr"),
           "201640614": q("n235859", "What is he wearing?", "t-shirt", "query", "obj"),
           "20968379": q("n161313", "Which side is the cup on?", "left", "choose", "rel")}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(doc))
    touch_images(tmp_path / "images", ["n161313.jpg", "n235859.jpg"])
    src = Source(tmp_path / "testdev_balanced_questions.json", tmp_path / "images")
    # GQA normalisation: trim, lower-case, trailing period dropped; then exact match ("the left" is not "left")
    s = score_task("gqa", src, tmp_path, {"201307251": " No.", "201640614": "T-Shirt", "20968379": "The left"})
    assert s["accuracy"] == pytest.approx(2 / 3) and s["count"] == 3
    assert s["by_structural"] == {"choose": 0.0, "query": 1.0, "verify": 1.0}
    assert s["by_semantic"] == {"attr": 1.0, "obj": 1.0, "rel": 0.0}
    assert gqa.normalize("  Two  cups. ") == "two cups"  # no VQA number-word or article rewriting
    (tmp_path / "dup.json").write_text('{"7": {"imageId": "n161313", "question": "a", "answer": "b"}, '
                                       '"7": {"imageId": "n161313", "question": "c", "answer": "d"}}')
    with pytest.raises(BenchmarkFileError, match=r"dup.json: key '7' appears twice in one object: entries 1 and 2"):
        score_task("gqa", Source(tmp_path / "dup.json", tmp_path / "images"), tmp_path, {})
    (tmp_path / "images" / "n235859.jpg").unlink()
    with pytest.raises(BenchmarkFileError, match=r"question '201640614': media file .*n235859.jpg not found"):
        score_task("gqa", src, tmp_path, {})


def test_vizwiz_val_vqa_accuracy_by_hand(tmp_path: Path) -> None:
    def rec(image: str, answers: list[str], answer_type: str, answerable: int) -> dict:
        return {"image": image, "question": "What is this?", "answer_type": answer_type, "answerable": answerable,
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
    doc = [rec("VizWiz_val_00000000.jpg", ["unanswerable"] * 6 + ["blue"] * 4, "unanswerable", 0),
           rec("VizWiz_val_00000001.jpg", ["blue"] * 2 + ["navy blue"] * 8, "other", 1)]
    (tmp_path / "val.json").write_text(json.dumps(doc))
    touch_images(tmp_path / "val", [d["image"] for d in doc])
    s = score_task("vizwiz", Source(tmp_path / "val.json", tmp_path / "val"), tmp_path,
                   {"VizWiz_val_00000000.jpg": "Unanswerable.", "VizWiz_val_00000001.jpg": "Blue"})
    # 1st: every 9-subset keeps >= 3 "unanswerable" -> 1. 2nd: leaving a "blue" out (2 subsets) keeps 1 -> 1/3,
    # leaving a "navy blue" out (8 subsets) keeps 2 -> 2/3: (2/3 + 16/3) / 10 = 0.6
    assert s["accuracy"] == pytest.approx((1 + 0.6) / 2)
    assert s["by_answer_type"] == pytest.approx({"other": 0.6, "unanswerable": 1.0})
    assert "When the provided information is insufficient" in get_task("vizwiz").prompt.template
    (tmp_path / "dup.json").write_text(json.dumps([doc[0], doc[1], doc[0]]))
    with pytest.raises(BenchmarkFileError, match=r"id 'VizWiz_val_00000000.jpg' appears twice: .*dup.json \[0\] "
                                                 r"and .*dup.json \[2\]"):
        score_task("vizwiz", Source(tmp_path / "dup.json", tmp_path / "val"), tmp_path, {})


def test_okvqa_released_files_vqa_accuracy_by_hand(tmp_path: Path) -> None:
    questions = {"info": {}, "license": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                 "questions": [{"image_id": 9, "question": "What sport can you use this for?", "question_id": 90},
                               {"image_id": 25, "question": "What is this man doing?", "question_id": 250}]}
    def ann(qid: int, image_id: int, answers: list[str]) -> dict:
        return {"image_id": image_id, "answer_type": "other", "question_type": "eight", "question_id": qid,
                "confidence": 3, "answers": [{"answer_id": i + 1, "raw_answer": a + "ing", "answer_confidence": "yes",
                                              "answer": a} for i, a in enumerate(answers)]}
    annotations = {"info": {}, "license": {}, "data_subtype": "val2014",
                   "annotations": [ann(90, 9, ["race"] * 4 + ["motocross"] * 6), ann(250, 25, ["surf"] * 10)]}
    (tmp_path / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (tmp_path / "mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    touch_images(tmp_path / "val2014", ["COCO_val2014_000000000009.jpg", "COCO_val2014_000000000025.jpg"])
    src = Source(tmp_path / "OpenEnded_mscoco_val2014_questions.json", tmp_path / "val2014",
                 tmp_path / "mscoco_val2014_annotations.json")
    # "A race." normalises to "race": every 9-subset keeps >= 3 of the 4 -> 1; "surfing" is not the processed "surf"
    s = score_task("okvqa", src, tmp_path, {"90": "A race.", "250": "surfing"})
    assert s["accuracy"] == pytest.approx(0.5) and s["count"] == 2
    with pytest.raises(BenchmarkFileError, match="pass its answers with --annotations"):
        score_task("okvqa", Source(src.data, src.images), tmp_path, {})


def test_train_time_benchmarks_accept_every_registered_task() -> None:
    import typing

    from lavis.config.schema import EvalBenchmarkConfig
    from lavis.eval.tasks import TASKS

    assert set(typing.get_args(typing.get_type_hints(EvalBenchmarkConfig)["task"])) == set(TASKS)
