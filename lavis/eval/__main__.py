"""Score a checkpoint on a benchmark in its own file format.

    python -m lavis.eval --cfg-path RUN/config.yaml -c RUN/model.pth --task vqa --data questions.json \\
        --annotations annotations.json --images val2014/ --out eval/vqav2

The model: ``--cfg-path`` / ``--model-type`` with ``-c`` as the chat front ends take them (a ``model.vlm`` run:
``-c RUN/global_stepN`` or ``-c RUN``), or ``--model-dir DIR``, a transformers Qwen2.5-VL / Qwen3-VL directory.

Tasks: vqa (VQAv2, OK-VQA, TextVQA), mcq (MMBench .tsv with circular evaluation, ScienceQA-IMG problems.json),
yesno (POPE .json lines, an MME release directory), caption (COCO captions file), video-qa (JSON lines), gqa (GQA
testdev_balanced_questions.json), vizwiz (VizWiz-VQA val.json), okvqa (OK-VQA questions + --annotations). Writes
``<out>/predictions.jsonl`` (resumed when re-run with the same checkpoint, config and settings; another checkpoint
is refused: use a new --out or --overwrite) and ``<out>/summary.json``, and prints the scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lavis.chat.engine import add_model_arguments
from lavis.chat.loading import config_path, load_engine
from lavis.config.load import load_config
from lavis.eval.common import BenchmarkFileError
from lavis.eval.identity import model_identity, read_identity
from lavis.eval.runner import format_table, full_identity, refuse_foreign_predictions, run_task, task_settings
from lavis.eval.tasks import TASKS, Source, get_task
from lavis.vlm.arch import check_model_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavis.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="the benchmark file (or MME's directory) as distributed")
    p.add_argument("--images", help="directory the file's image/video names are relative to")
    p.add_argument("--annotations", help="vqa, okvqa: the VQAv2/OK-VQA annotations file (answers) for --data's "
                                         "questions")
    p.add_argument("--split", help="mcq ScienceQA: only problems of this split (e.g. test)")
    p.add_argument("--out", help="output directory (default: eval/<task>-<data name>)")
    p.add_argument("--limit", type=int, help="only the first N samples (N rotations for MMBench)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="answer length (default: the task's)")
    p.add_argument("--prompt", help="prompt template instead of the task's (str.format fields, e.g. '{question}'); "
                                    "recorded in the summary as version 'custom'")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out's predictions over instead of resuming them (needed when they were written by "
                        "another checkpoint, config or generation settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = Path(args.data)
    out = Path(args.out) if args.out else Path("eval") / f"{args.task}-{data.stem}"
    src = Source(data, Path(args.images) if args.images else None,
                 Path(args.annotations) if args.annotations else None, args.split)
    try:
        task = get_task(args.task)
        predictions = out / "predictions.jsonl"
        known = None if args.overwrite else read_identity(predictions)
        cfg_path = config_path(args)
        if cfg_path is None:  # --model-dir: the directory is the checkpoint, its config.json the config
            model_dir = check_model_dir(args.model_dir)
            identity = model_identity(model_dir / "config.json", args.options, model_dir, known=known)
        else:
            identity = model_identity(cfg_path, args.options, args.checkpoint_path
                                      or load_config(cfg_path, list(args.options)).model.checkpoint, known=known)
        if not args.overwrite:  # before the model loads: refuse another model's predictions at once
            refuse_foreign_predictions(predictions, full_identity(identity, task_settings(task, args.max_new_tokens)))
        engine = load_engine(args, "cpu" if args.cpu_only else "auto", args.options)
        summary = run_task(engine, args.task, src, out, prompt=args.prompt, batch_size=args.batch_size,
                           limit=args.limit, max_new_tokens=args.max_new_tokens,
                           meta={"config": str(cfg_path or args.model_dir), "checkpoint": args.checkpoint_path},
                           progress=not args.quiet, identity=identity, overwrite=args.overwrite)
    except (BenchmarkFileError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(summary))
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
