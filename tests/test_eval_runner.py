"""The benchmark runner: resume without recomputing, batched generation equal to the chat engine's one-by-one
answers, and the command line end to end on the tiny shapes model (random weights)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lavis.chat.engine import ChatEngine, GenerationSettings, load_model
from lavis.config.load import load_config
from lavis.data import shapes
from lavis.data.conversation import template_from_config
from lavis.data.tokenizer import load_tokenizer
from lavis.eval import yesno
from lavis.eval.__main__ import main as eval_main
from lavis.eval.common import BenchmarkFileError, Sample
from lavis.eval.generate import generate_answers
from lavis.eval.identity import file_fingerprint, mismatch
from lavis.eval.runner import answer_all, evaluate, full_identity
from lavis.eval.tasks import Source, get_task, load_samples
from lavis.weights.base import model_shapes

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "lavis/projects/demo/shapes.yaml"


class Interrupt(RuntimeError):
    pass


class FakeModel:
    """Answers "yes" to even ids, "no" to odd ones; records what it was asked; can fail on the N-th call."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.asked: list[str] = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, samples: Sequence[Sample], settings: GenerationSettings, batch_size: int) -> list[str]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise Interrupt("killed")
        self.asked += [s.id for s in samples]
        return ["Yes" if int(s.id) % 2 == 0 else "No" for s in samples]


def pope_samples(n: int) -> list[Sample]:
    return [Sample(str(i), f"Is there a thing {i}?", ["x.jpg"], gold={"label": "yes" if i % 3 else "no"})
            for i in range(n)]


IDENT = {"checkpoint": {"path": "/a.pth", "size": 3, "blake2b": "aa"},
         "config": {"path": "/c.yaml", "size": 5, "blake2b": "cc"}, "options": []}


def test_interrupted_eval_resumes_without_recomputing(tmp_path: Path) -> None:
    samples = pope_samples(10)
    task = get_task("yesno")
    first = FakeModel(fail_on_call=3)  # batches of 4: two finish (8 samples), the third is interrupted
    with pytest.raises(Interrupt):
        evaluate(task, samples, first, tmp_path, settings=GenerationSettings(), batch_size=4, prompt=task.prompt,
                 meta={}, progress=False, identity=IDENT)
    assert first.asked == [str(i) for i in range(8)]
    with open(tmp_path / "predictions.jsonl", "a") as fh:  # a line half-written when the process was killed
        fh.write('{"id": "8", "que')
    second = FakeModel()
    summary = evaluate(task, samples, second, tmp_path, settings=GenerationSettings(), batch_size=4,
                       prompt=task.prompt, meta={}, progress=False, identity=IDENT)
    assert second.asked == ["8", "9"] and summary["generated_now"] == 2
    rows = [json.loads(ln) for ln in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(10)]
    assert summary["scores"] == yesno.score_pope(rows)
    assert json.loads((tmp_path / "summary.json").read_text())["prompt"] == {"template": "{question}",
                                                                             "version": "yesno-v1"}
    third = FakeModel()
    answer_all(samples, third, GenerationSettings(), 4, tmp_path / "predictions.jsonl", progress=False,
               identity=full_identity(IDENT, GenerationSettings()))
    assert third.asked == []
    fourth = FakeModel()  # without an identity (train-time evaluation) nothing is resumed
    answer_all(samples, fourth, GenerationSettings(), 4, tmp_path / "predictions.jsonl", progress=False)
    assert fourth.asked == [str(i) for i in range(10)]


def test_resume_refuses_predictions_of_another_prompt(tmp_path: Path) -> None:
    samples = pope_samples(3)
    answer_all(samples, FakeModel(), GenerationSettings(), 2, tmp_path / "p.jsonl", progress=False, identity=IDENT)
    changed = [Sample(s.id, s.query + " Answer yes or no.", s.media, gold=s.gold) for s in samples]
    with pytest.raises(BenchmarkFileError, match="another prompt"):
        answer_all(changed, FakeModel(), GenerationSettings(), 2, tmp_path / "p.jsonl", progress=False,
                   identity=IDENT)


def test_resume_refuses_predictions_of_other_settings_or_without_a_record(tmp_path: Path) -> None:
    samples, path = pope_samples(3), tmp_path / "predictions.jsonl"
    evaluate(get_task("yesno"), samples, FakeModel(), tmp_path, settings=GenerationSettings(max_new_tokens=4),
             batch_size=2, prompt=get_task("yesno").prompt, meta={}, progress=False, identity=IDENT)
    with pytest.raises(BenchmarkFileError, match=r"generation: .*max_new_tokens\": 4.* there, .*max_new_tokens\": 9"):
        evaluate(get_task("yesno"), samples, FakeModel(), tmp_path, settings=GenerationSettings(max_new_tokens=9),
                 batch_size=2, prompt=get_task("yesno").prompt, meta={}, progress=False, identity=IDENT)
    (tmp_path / "predictions.identity.json").unlink()  # e.g. written before identities were recorded
    with pytest.raises(BenchmarkFileError, match="predictions.identity.json.*is missing.*--overwrite"):
        answer_all(samples, FakeModel(), GenerationSettings(), 2, path, progress=False, identity=IDENT)


def test_fingerprint_reuses_a_hash_only_for_the_unchanged_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"weights-1")
    first = file_fingerprint(ckpt)
    assert first["blake2b"] == hashlib.blake2b(b"weights-1", digest_size=16).hexdigest() and first["size"] == 9
    planted = {**first, "blake2b": "from-the-record"}
    assert file_fingerprint(ckpt, known=planted)["blake2b"] == "from-the-record"  # unchanged: not read again
    time.sleep(0.05)  # let the clock move past the file's ctime granularity
    st = ckpt.stat()
    ckpt.write_bytes(b"weights-2")  # same size, mtime put back: only the ctime tells
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = file_fingerprint(ckpt, known=planted)
    assert again["blake2b"] == hashlib.blake2b(b"weights-2", digest_size=16).hexdigest()
    assert mismatch({"checkpoint": first}, {"checkpoint": again}) is not None
    copy = tmp_path / "copy.pth"
    copy.write_bytes(b"weights-1")
    assert mismatch({"checkpoint": first}, {"checkpoint": file_fingerprint(copy)}) is None  # same content elsewhere


def test_duplicate_ids_are_refused_naming_both_places(tmp_path: Path) -> None:
    """A repeated question id used to count one answer twice and drop another."""
    img = tmp_path / "1.jpg"
    img.write_bytes(b"")
    rows = [{"question_id": q, "image": "1.jpg", "text": "Is it red?", "label": "yes"} for q in (1, 2, 3, 2)]
    data = tmp_path / "pope.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchmarkFileError, match=r"id '2' appears twice: .*pope.jsonl record 2 and .*pope.jsonl "
                                                 r"record 4"):
        load_samples(get_task("yesno"), Source(data, tmp_path), tmp_path, get_task("yesno").prompt)
    same = pope_samples(3) + pope_samples(1)  # the runner keys answers by id too
    with pytest.raises(BenchmarkFileError, match="id '0' appears twice: sample #1 and sample #4"):
        answer_all(same, FakeModel(), GenerationSettings(), 2, tmp_path / "p.jsonl", progress=False)
    doc = {"data_subtype": "val2014", "questions": [{"question_id": 7, "image_id": 1, "question": "?"}]}
    ann = {"annotations": [{"question_id": 7, "answers": [{"answer": "a"}]},
                           {"question_id": 7, "answers": [{"answer": "b"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(doc))
    (tmp_path / "a.json").write_text(json.dumps(ann))
    with pytest.raises(BenchmarkFileError, match=r"question_id 7 appears twice in .*a.json annotations: \[0\] and "
                                                 r"\[1\]"):
        load_samples(get_task("vqa"), Source(tmp_path / "q.json", tmp_path, tmp_path / "a.json"), tmp_path,
                     get_task("vqa").prompt)
    (tmp_path / "sqa.json").write_text('{"5": {"question": "a"}, "6": {}, "5": {"question": "b"}}')
    with pytest.raises(BenchmarkFileError, match=r"sqa.json: key '5' appears twice in one object: entries 1 and 3"):
        load_samples(get_task("mcq"), Source(tmp_path / "sqa.json", tmp_path), tmp_path, get_task("mcq").prompt)


@pytest.fixture(scope="module")
def tiny_engine() -> ChatEngine:
    cfg = load_config(CFG)
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    model = load_model(cfg, None, tok, torch.device("cpu"), torch.float32)
    return ChatEngine(model, template_from_config(tok, cfg), cfg.model.vision.image_size, torch.device("cpu"))


def test_batched_left_padded_generation_matches_the_chat_engine(tiny_engine: ChatEngine, tmp_path: Path) -> None:
    """Prompts of different lengths (one without an image) in one left-padded batch give the chat engine's
    one-at-a-time greedy answers."""
    pairs = shapes.generate_eval_images(tmp_path, 2, seed=0)
    samples = [Sample("a", "What is in the image?", [str(pairs[0][0])]),
               Sample("b", "Is it a red circle? Tell me in one short sentence please.", [str(pairs[1][0])]),
               Sample("c", "Hello", [])]
    settings = GenerationSettings(max_new_tokens=6)
    batched = generate_answers(tiny_engine, samples, settings, batch_size=3)
    assert batched == [tiny_engine.answer(s.media, s.query, settings) for s in samples]
    assert any(batched)  # random weights still emit some text


def test_cli_writes_predictions_summary_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = shapes.write_benchmarks(tmp_path / "bench", 3, seed=1)
    pope = [json.loads(ln) for ln in files["yesno"].read_text().splitlines()]
    assert len(pope) == 6 and {r["label"] for r in pope} <= {"yes", "no"}
    out = tmp_path / "out"
    args = ["--cfg-path", str(CFG), "--cpu-only", "--task", "vqa", "--data", str(files["vqa"]), "--images",
            str(files["images"]), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3", "--quiet",
            "--prompt", "{question}"]
    assert eval_main([*args, "--limit", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["generated_now"] == 2
    assert eval_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated_now"] == 1 and summary["samples"] == 3
    assert summary["prompt"] == {"template": "{question}", "version": "custom"}
    assert 0.0 <= summary["scores"]["accuracy"] <= 1.0
    assert "vqa (3 samples, prompt custom)" in capsys.readouterr().out
    assert eval_main([*args[:-2], "--task", "yesno"]) == 1  # the vqa file is not POPE's layout
    assert "missing key 'label'" in capsys.readouterr().err


def test_cli_resumes_only_with_the_same_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another checkpoint's predictions in --out used to be resumed and reported as the new checkpoint's."""
    files = shapes.write_benchmarks(tmp_path / "bench", 3, seed=1)
    shape = model_shapes(load_config(CFG).model)["llm_proj.weight"]
    g = torch.Generator().manual_seed(0)
    a, b, moved = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "moved" / "a.pth"
    torch.save({"llm_proj.weight": torch.randn(shape, generator=g)}, a)
    torch.save({"llm_proj.weight": torch.randn(shape, generator=g)}, b)
    out = tmp_path / "out"
    args = ["--cfg-path", str(CFG), "--cpu-only", "--task", "vqa", "--data", str(files["vqa"]), "--images",
            str(files["images"]), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3", "--quiet"]
    assert eval_main([*args, "-c", str(a), "--limit", "2"]) == 0
    capsys.readouterr()
    assert eval_main([*args, "-c", str(b)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint: {a} (" in err and f"{b} (" in err and "new --out, or --overwrite" in err, err
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2  # refused before touching anything
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())  # the same checkpoint elsewhere is the same model: resumed
    assert eval_main([*args, "-c", str(moved)]) == 0
    assert json.loads((out / "summary.json").read_text())["generated_now"] == 1
    moved.write_bytes(b.read_bytes())  # another checkpoint at the recorded path: refused
    assert eval_main([*args, "-c", str(moved)]) == 1
    assert "blake2b" in capsys.readouterr().err
    assert eval_main([*args, "-c", str(b), "--overwrite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated_now"] == 3 and summary["identity"]["checkpoint"]["path"] == str(b.resolve())
    assert eval_main([*args, "-c", str(b), "--options", "model.init_seed=5"]) == 1
    assert "options: [] there, [\"model.init_seed=5\"] now" in capsys.readouterr().err


def test_shapes_benchmark_files_are_deterministic_and_consistent(tmp_path: Path) -> None:
    a = shapes.write_benchmarks(tmp_path / "a", 9, seed=7)
    b = shapes.write_benchmarks(tmp_path / "b", 9, seed=7)
    assert a["vqa"].read_text() == b["vqa"].read_text() and a["yesno"].read_text() == b["yesno"].read_text()
    vqa_rows = json.loads(a["vqa"].read_text())["data"]
    assert [r["answer_type"] for r in vqa_rows] == ["describe", "colour", "shape"] * 3
    pope = [json.loads(ln) for ln in a["yesno"].read_text().splitlines()]
    for q, (shape_q, colour_q) in zip(vqa_rows, zip(pope[::2], pope[1::2])):
        truth = q["answers"][0]
        assert q["answers"] == [truth] * 10 and truth == truth.lower()
        assert shape_q["image"] == colour_q["image"] == f"{q['image_id']}.jpg"
        asked_shape = shape_q["text"].removeprefix("Is it a ").rstrip("?")
        asked_colour = colour_q["text"].removeprefix("Is it ").rstrip("?")
        if q["answer_type"] == "shape":
            assert (shape_q["label"] == "yes") == (asked_shape == truth)
        if q["answer_type"] == "colour":
            assert (colour_q["label"] == "yes") == (asked_colour == truth)
    assert {r["label"] for r in pope} == {"yes", "no"}
