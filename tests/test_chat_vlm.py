"""Chat with native-resolution VLMs (``lavis.chat.vlm_engine``): ``cli_demo.py --model-dir`` on tiny random
Qwen2.5-VL and Qwen3-VL directories (processor with the real Qwen vocabulary) answers as transformers' own
``generate``; a 2-stage run of the tiny demo recipe answered through ``--cfg-path RUN/config.yaml -c ...`` answers as
its ``--hf-out`` export loaded in transformers; the API server and the evaluator take ``--model-dir``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lavis.chat.cli import main as cli_main
from lavis.chat.engine import GenerationSettings, Request
from lavis.chat.vlm_engine import VLMChatEngine
from lavis.data import shapes
from lavis.eval.__main__ import main as eval_main
from lavis.eval.tasks import Source, get_task, load_samples
from lavis.testing.synthetic_vlm import published_token_ids
from lavis.testing.vlm import FAMILIES, tiny_hf_config, tiny_hf_dict

from .conftest import REPO, data_options, launch

MAX_NEW = 10
QUESTION = "Compare the two pictures."


def write_chat_dir(path: Path, family: str, processor_dir: Path, seed: int = 0) -> Path:
    """A tiny random ``family`` model whose ids are the real Qwen vocabulary's (151936 rows, the published special
    ids), saved by transformers, with the processor files of ``processor_dir`` beside it."""
    ids = published_token_ids(family)
    raw = tiny_hf_dict(family)
    raw.pop("model_type")
    raw.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    raw["vision_config"]["patch_size"] = 16 if family == "qwen3_vl" else 14  # the published processors' patches
    raw["text_config"].update(vocab_size=151936, pad_token_id=ids["<|endoftext|>"],
                              bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(type(tiny_hf_config(family))(**raw)).save_pretrained(path)
    for f in processor_dir.iterdir():
        shutil.copy2(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def chat_dirs(qwen_vl_processor_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_chat")
    return {f: write_chat_dir(root / f, f, qwen_vl_processor_dirs[f]) for f in FAMILIES}


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two images of different, non-square sizes (a wide one and a tall one)."""
    root = tmp_path_factory.mktemp("images")
    out = []
    for name, size, colour in (("wide.png", (84, 46), (200, 30, 30)), ("tall.png", (40, 100), (20, 60, 220))):
        img = Image.new("RGB", size, colour)
        img.paste((240, 240, 20), (5, 5, size[0] // 2, size[1] // 3))
        img.save(root / name)
        out.append(root / name)
    return out


def reference_answer(model: Any, processor: Any, content: list[dict[str, Any]], images: list[Path],
                     stop_ids: list[int], max_new: int = MAX_NEW) -> str:
    """transformers alone: the chat template with the generation prompt, the processor, greedy ``generate`` (ending
    at the chat engine's end ids), special tokens left out of the text."""
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pictures = [Image.open(p).convert("RGB") for p in images]
    inputs = processor(text=[text], images=pictures or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new, eos_token_id=stop_ids)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_demo_model_dir_greedy_answers_equal_transformers_generate(
        family: str, chat_dirs: dict[str, Path], two_images: list[Path], tmp_path: Path) -> None:
    """``cli_demo.py --model-dir DIR --batch`` (its main, in-process): two non-square images before the question,
    the same images placed by typed markers, and a text-only question answer exactly as transformers' generate."""
    directory = chat_dirs[family]
    jobs = [{"id": "two", "images": [str(p) for p in two_images], "query": QUESTION},
            {"id": "marked", "images": [str(p) for p in two_images], "query": "Is <image> larger than <image>?"},
            {"id": "text", "query": "Hello there"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    assert cli_main(["--model-dir", str(directory), "--cpu-only", "--batch", str(src), "--out", str(out),
                     "--max-new-tokens", str(MAX_NEW)]) == 0
    ours = {r["id"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}

    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(directory)
    ids = published_token_ids(family)
    stop = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    image = {"type": "image"}
    want = {
        "two": reference_answer(model, processor, [image, image, {"type": "text", "text": QUESTION}], two_images, stop),
        "marked": reference_answer(model, processor, [{"type": "text", "text": "Is "}, image,
                                                      {"type": "text", "text": " larger than "}, image,
                                                      {"type": "text", "text": "?"}], two_images, stop),
        "text": reference_answer(model, processor, [{"type": "text", "text": "Hello there"}], [], stop),
    }
    assert ours == want
    assert all(want.values()) and want["two"] != want["text"]  # random weights still answer, and the images matter


@pytest.fixture(scope="module")
def engines(chat_dirs: dict[str, Path]) -> dict[str, VLMChatEngine]:
    return {f: VLMChatEngine.from_model_dir(d, device="cpu") for f, d in chat_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_native_resolution_batching_stops_and_context(family: str, engines: dict[str, VLMChatEngine],
                                                      two_images: list[Path]) -> None:
    """Each image keeps its own aspect (its own patch grid); a batch answers as one at a time; a stop string cuts
    the answer; a prompt over the context is refused naming its size."""
    engine = engines[family]
    turn = engine.make_turn(QUESTION, [engine.load_media(p) for p in two_images])
    grids = engine.inputs([turn])["image_grid_thw"].tolist()
    assert grids[0][2] > grids[0][1] and grids[1][1] > grids[1][2]  # wide stays wide, tall stays tall
    visual = sum(t * h * w for t, h, w in grids) // 4
    assert engine.encode([turn]).count(engine.processor.image_token_id) == visual
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    alone = engine.generate([turn], settings)
    text_only = engine.make_turn("Hello there", [])
    batch = engine.generate_batch([[turn], [text_only]], settings)
    assert [a.text for a in batch] == [alone.text, engine.generate([text_only], settings).text]
    assert alone.finish_reason == "length" and alone.completion_tokens == MAX_NEW
    assert alone.prompt_tokens == len(engine.encode([turn]))
    cut = alone.text[3:6]
    stopped = engine.run([Request([turn], stop_strings=[cut])], settings)[0]
    assert stopped.finish_reason == "stop" and stopped.text == alone.text[:alone.text.index(cut)].strip()
    long = engine.make_turn("word " * 600, [])
    with pytest.raises(ValueError, match="at or over the model's context of 512"):
        engine.encode([long])


def test_model_dir_that_is_not_a_supported_vlm_is_one_line_error(tmp_path: Path, chat_dirs: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama/config.json").write_text('{"model_type": "llama"}')
    for directory, expected in ((tmp_path / "none", "not a directory"),
                                (tmp_path, f"{tmp_path / 'config.json'} not found"),
                                (tmp_path / "llama", "model_type 'llama' is not a supported VLM (expected one of "
                                                     "qwen2_5_vl, qwen3_vl)")):
        assert cli_main(["--model-dir", str(directory), "--cpu-only", "--query", "hi"]) == 1
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    from lavis.chat.webui import main as webui_main

    assert webui_main(["--model-dir", str(tmp_path / "llama")]) == 1  # before any server starts
    assert "is not a supported VLM" in capsys.readouterr().err
    no_processor = Path(shutil.copytree(chat_dirs["qwen2_5_vl"], tmp_path / "bare"))
    for name in ("processor_config.json", "preprocessor_config.json"):  # one or both, by transformers version
        (no_processor / name).unlink(missing_ok=True)
    assert cli_main(["--model-dir", str(no_processor), "--cpu-only", "--query", "hi"]) == 1
    assert "no processor_config.json or preprocessor_config.json" in capsys.readouterr().err


def test_api_server_answers_with_model_dir(engines: dict[str, VLMChatEngine], two_images: list[Path]) -> None:
    """The OpenAI-compatible app over a VLM engine: two inline images answer as the engine does; a prompt whose
    images overflow the context (known only once decoded) is a 400 naming the context."""
    from fastapi.testclient import TestClient

    from lavis.serve.app import ServeOptions, build_app, build_parser
    from lavis.serve.scheduler import Scheduler

    assert build_parser().parse_args(["--model-dir", "D"]).model_dir == "D"
    engine = engines["qwen3_vl"]
    scheduler = Scheduler(engine, max_queue=4, max_batch=2)
    scheduler.start()
    app = TestClient(build_app(engine, scheduler, ServeOptions(max_new_tokens=MAX_NEW)))
    urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in two_images]
    content = [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": QUESTION}]
    res = app.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                 "temperature": 0})
    assert res.status_code == 200, res.text
    want = engine.answer(two_images, QUESTION, GenerationSettings(max_new_tokens=MAX_NEW))
    assert res.json()["choices"][0]["message"]["content"] == want
    assert res.json()["usage"]["prompt_tokens"] == len(engine.encode([engine.make_turn(
        QUESTION, [engine.load_media(p) for p in two_images])]))
    big = two_images[0].parent / "big.png"
    Image.new("RGB", (28 * 16, 28 * 16), (9, 9, 9)).save(big)  # 64 visual tokens: the tiny budget's most
    url = "data:image/png;base64," + base64.b64encode(big.read_bytes()).decode()
    words = "word " * 380  # fits with the three images' placeholders; with their 192 visual tokens it does not
    res = app.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}] * 3 + [{"type": "text", "text": words}]}]})
    assert res.status_code == 400 and res.json()["error"]["code"] == "context_length_exceeded", res.text
    assert "3 image(s)" in res.json()["error"]["message"]


def test_eval_takes_model_dir(chat_dirs: dict[str, Path], engines: dict[str, VLMChatEngine], tmp_path: Path) -> None:
    """``python -m lavis.eval --model-dir DIR`` (its main) on a tiny POPE file: every prediction is the chat
    engine's answer; a re-run resumes (same directory), the predictions of another directory are refused."""
    files = shapes.write_benchmarks(tmp_path / "bench", 2, seed=1)
    out = tmp_path / "out"
    args = ["--model-dir", str(chat_dirs["qwen2_5_vl"]), "--cpu-only", "--task", "yesno", "--data",
            str(files["yesno"]), "--images", str(files["images"]), "--out", str(out), "--batch-size", "3",
            "--max-new-tokens", "4", "--quiet"]
    assert eval_main(args) == 0
    rows = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    task = get_task("yesno")
    samples, _ = load_samples(task, Source(files["yesno"], files["images"]), out, task.prompt)
    engine = engines["qwen2_5_vl"]
    settings = GenerationSettings(max_new_tokens=4)
    assert {r["id"]: r["prediction"] for r in rows} == {s.id: engine.answer(s.media, s.query, settings)
                                                        for s in samples}
    assert eval_main(args) == 0
    assert json.loads((out / "summary.json").read_text())["generated_now"] == 0
    other = [*args]
    other[1] = str(chat_dirs["qwen3_vl"])
    assert eval_main(other) == 1


@pytest.mark.process
def test_cli_demo_script_with_model_dir(chat_dirs: dict[str, Path], two_images: list[Path]) -> None:
    """The script itself (one-shot mode) prints the in-process engine's answer."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "cli_demo.py"), "--model-dir", str(chat_dirs["qwen3_vl"]),
                           "--image", str(two_images[0]), "--image", str(two_images[1]), "--query", QUESTION,
                           "--max-new-tokens", str(MAX_NEW)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine = VLMChatEngine.from_model_dir(chat_dirs["qwen3_vl"], device="cpu")
    assert proc.stdout.strip() == engine.answer(two_images, QUESTION, GenerationSettings(max_new_tokens=MAX_NEW))


DEMO_RECIPE = REPO / "lavis/projects/demo/shapes_qwen2_5_vl.yaml"
RUN_OPTIONS = ["train.batch.micro_batch_size=2", "train.batch.grad_accum_steps=1", "train.optim.warmup_steps=0",
               "train.optim.lr=1e-3", "train.precision=fp32", "train.checkpoint.save_every=1",
               "train.checkpoint.keep_last=3", "train.num_threads=1"]


@pytest.fixture(scope="module")
def vlm_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL demo recipe trained 2 steps on 2 stages, a checkpoint after each step."""
    out = tmp_path_factory.mktemp("vlm_run") / "pp2"
    proc = launch(2, ["--cfg-path", str(DEMO_RECIPE), "--num-stages", "2", "--max-steps", "2", "--output-dir",
                      str(out), "--options", *RUN_OPTIONS, *data_options(tiny_data)])
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.mark.process
def test_run_answered_through_cfg_path_equals_its_hf_out_export(vlm_run: Path, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    """``--cfg-path RUN/config.yaml -c RUN/global_step2`` (and ``-c RUN``: its latest) answers as the run's
    ``pipemodel2pth.py --hf-out`` directory does in transformers (``AutoModelForImageTextToText`` +
    ``AutoProcessor`` + ``generate``), and as ``--model-dir`` of that directory; ``-c RUN/global_step1`` is
    another model."""
    images = sorted((tiny_data / "images/train").glob("*.jpg"))[:2]
    question = "What colour is the shape?"
    hf_out = tmp_path / "hf"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "pipemodel2pth.py"), "--ckpt-dir", str(vlm_run), "--hf-out",
                           str(hf_out), "--hf-dtype", "fp32"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForImageTextToText.from_pretrained(hf_out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf_out)

    cfg = vlm_run / "config.yaml"
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    jobs = [{"id": "two", "images": [str(p) for p in images], "query": question},
            {"id": "one", "images": [str(images[0])], "query": question}]
    src.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    answers = {}
    for ckpt in (vlm_run / "global_step2", vlm_run, vlm_run / "global_step1"):
        assert cli_main(["--cfg-path", str(cfg), "-c", str(ckpt), "--cpu-only", "--batch", str(src), "--out",
                         str(out), "--max-new-tokens", str(MAX_NEW)]) == 0
        answers[ckpt.name] = {r["id"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}
    engine = VLMChatEngine.from_model_dir(hf_out, device="cpu")
    stop = engine.stop_ids
    image = {"type": "image"}
    text = {"type": "text", "text": question}
    want = {"two": reference_answer(model, processor, [image, image, text], images, stop),
            "one": reference_answer(model, processor, [image, text], images[:1], stop)}
    assert answers["global_step2"] == want == answers[vlm_run.name]
    assert {j["id"]: engine.answer(j["images"], question, GenerationSettings(max_new_tokens=MAX_NEW))
            for j in jobs} == want
    assert answers["global_step1"] != want  # the checkpoint given is the one answering
    with pytest.raises(ValueError, match="a model.vlm run's checkpoint is a directory"):
        VLMChatEngine.from_run(cfg, vlm_run / "config.yaml", device="cpu")


def test_inspect_model_dir_accounts_for_every_tensor(chat_dirs: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m lavis.inspect --model-dir DIR [--forward]`` (its main): every tensor of the directory against its
    config, one forward through the processor; a directory with a tensor missing fails naming it."""
    from safetensors.torch import load_file, save_file

    from lavis.inspect import main as inspect_main

    directory = chat_dirs["qwen3_vl"]
    assert inspect_main(["--model-dir", str(directory), "--forward"]) == 0
    out = capsys.readouterr().out
    assert "VLM: qwen3_vl" in out and " 0 missing, 0 unexpected" in out and "finite=True" in out and "OK" in out
    damaged = Path(shutil.copytree(directory, tmp_path / "damaged"))
    shard = damaged / "model.safetensors"
    tensors = load_file(shard)
    key = next(k for k in tensors if "visual.blocks.1." in k)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    assert inspect_main(["--model-dir", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert "1 missing" in out and "FAILED" in out
