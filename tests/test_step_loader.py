"""StepLoader's worker processes: they ignore SIGTERM, so the trainer stops them itself (``StepLoader.close``);
otherwise multiprocessing's exit handler would wait for them forever after a finished run."""

from __future__ import annotations

import multiprocessing

from lavis.config.schema import Config
from lavis.data.collate import Collator
from lavis.data.conversation import template_from_config
from lavis.data.datasets import ConversationDataset, StepSampler, load_records
from lavis.data.step_loader import StepLoader
from lavis.data.tokenizer import ENDOFTEXT, load_tokenizer


def test_close_stops_the_workers(tiny_cfg: Config) -> None:
    cfg = tiny_cfg
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    records = load_records(cfg.data.train[0])
    dataset = ConversationDataset(records, template_from_config(tok, cfg), cfg.data, cfg.model.vision.image_size,
                                  load_media=True, label_mode=cfg.data.label_mode)
    sampler = StepSampler([len(records)], [1.0], seed=0, micro_batch_size=2, grad_accum_steps=2, dp_rank=0,
                          dp_size=1, start_step=0)
    collate = Collator(tok.token_id(ENDOFTEXT), cfg.data.max_txt_len, cfg.data.pad_to_multiple_of, False)
    before = set(multiprocessing.active_children())
    loader = StepLoader(dataset, sampler, collate, grad_accum_steps=2, micro_batch_size=2, dp_rank=0, dp_size=1,
                        on_bad_sample="raise", num_workers=1)
    assert len(next(loader.next_step(0))[1]) == 2  # a real micro-batch came from the worker: labels of 2 samples
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 1
    loader.close()
    workers[0].join(timeout=120)  # a generous bound, not a timing assertion: it exits as soon as it is told to
    assert not workers[0].is_alive() and loader.next_step(1) is None
