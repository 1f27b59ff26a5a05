"""One optimizer step of micro-batches for the pipeline engine, with ``data.on_bad_sample`` handled in lock-step.

Only the first pipeline stage decodes media; the last stage builds labels only. With ``raise`` (the default) the
micro-batches stream into ``train_batch`` as the schedule asks for them (decoding overlaps the pipeline's waits) and
the first bad sample raises :class:`BadSampleError` on the stage that meets it, naming the record; the launcher then
stops the other ranks. With ``skip`` both stages must feed ``train_batch`` exactly the same samples, so a bad sample
is decided for the whole step before ``train_batch``:

1. The first and last stages fetch all GAS micro-batches of the step (decoding happens here, in DataLoader workers
   if ``data.num_workers`` > 0). A sample that raises :class:`SampleError` or :class:`MediaError` is kept as an
   error string instead of a sample; nothing is substituted.
2. Every rank (middle stages too) calls one ``all_reduce(MAX)`` over the world group on a ``[D, GAS, m]`` flag
   tensor, at the same point of the loop (outside ``train_batch``, never inside the data iterator, which the two
   stages call at different times). If any flag is set, one ``all_gather_object`` shares the reasons.
3. The flagged samples are left out of their micro-batch on both stages, logged with record id and reason, and
   counted; a micro-batch whose samples are all bad raises :class:`BadSampleError` (an empty micro-batch cannot run
   through the pipeline).

Skipping changes a micro-batch's size, which needs DeepSpeed's ``dynamic_shape`` (``data.fixed_length: false``).
"""

from __future__ import annotations

import logging
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from lavis.cli import InputError
from lavis.data.conversation import SampleError, TooLongError
from lavis.data.datasets import Key, Sample, StepSampler
from lavis.data.media import MediaError

logger = logging.getLogger(__name__)


class BadSampleError(InputError):
    """A training sample could not be built (``data.on_bad_sample: raise``); the message names the record."""


@dataclass
class Fetched:
    key: Key
    sample: Sample | None
    error: str | None


def reason_of(error: Exception) -> str:
    """Short reason category for counts."""
    if isinstance(error, TooLongError):
        return "too_long"
    if isinstance(error, MediaError):
        return "media"
    return "malformed"


MicroBatch = tuple[Any, ...]
"""What a dataset's ``collate`` makes of a micro-batch's samples (:class:`lavis.data.collate.PipeBatch`, or another
model family's named tuple): the ``(inputs, labels)`` DeepSpeed's pipeline reads."""


class StepDataset(Protocol):
    """What the loader reads from a dataset: a :class:`ConversationDataset`, or another model family's (the VLM's
    ``VLMConversationDataset``), whose samples its ``collate`` turns into a micro-batch."""

    records: Any

    def __len__(self) -> int: ...

    def __getitem__(self, key: Key) -> Any: ...

    def num_tokens(self, index: int) -> int: ...


class SafeDataset(torch.utils.data.Dataset):
    """Wraps a :class:`ConversationDataset`: ``__getitem__`` returns a :class:`Fetched` instead of raising."""

    def __init__(self, dataset: StepDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> Fetched:
        try:
            return Fetched(key, self.dataset[key], None)
        except (SampleError, MediaError) as e:
            return Fetched(key, None, f"{reason_of(e)}: {e}")


def _as_list(batch: list[Fetched]) -> list[Fetched]:
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGINT: a scheduler signals every process of a job, and the training
    process, which finishes its step and saves before exiting (``engine.guards.StopSignal``), still needs them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StepLoader:
    """Per-step micro-batches; :meth:`next_step` is a collective that every rank calls once per optimizer step.

    ``dataset``/``sampler``/``collate`` are None on middle stages (they read no data but join the collective).
    """

    def __init__(
        self,
        dataset: StepDataset | None,
        sampler: StepSampler | None,
        collate: Callable[[list[Any]], MicroBatch] | None,
        *,
        grad_accum_steps: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        on_bad_sample: Literal["raise", "skip"],
        num_workers: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.dataset, self.collate = dataset, collate
        self.gas, self.m, self.dp_rank, self.dp_size = grad_accum_steps, micro_batch_size, dp_rank, dp_size
        self.on_bad_sample = on_bad_sample
        self.device = device or torch.device("cpu")
        self.skipped: list[tuple[int, str, str]] = []
        """``(step, record id, reason)`` of every skipped sample (all DP ranks; identical on every rank)."""
        self.sampler = sampler
        self._flags = torch.zeros(dp_size, grad_accum_steps, micro_batch_size, dtype=torch.int32)
        self._fetched_tokens: dict[int, int] = {}
        """Record index -> token count of the samples this process fetched in the last step: a sample made in a
        DataLoader worker is not made again to be counted (:meth:`step_tokens`)."""
        self._iter: Iterator[list[Fetched]] | None = None
        if dataset is not None:
            # Workers may run a whole optimizer step ahead (prefetch_factor x workers >= GAS micro-batches), so the
            # next step decodes while this one trains even though next_step() pulls all GAS micro-batches at once.
            prefetch = max(2, -(-grad_accum_steps // num_workers)) if num_workers > 0 else None
            loader = torch.utils.data.DataLoader(
                SafeDataset(dataset), batch_sampler=sampler, collate_fn=_as_list,
                num_workers=num_workers, persistent_workers=num_workers > 0, prefetch_factor=prefetch,
                worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
            )
            self._iter = iter(loader)

    def next_step(self, step: int) -> Iterator[MicroBatch] | list[MicroBatch] | None:
        """This rank's micro-batches of ``step`` (None on stages that read no data). ``skip``: a collective that
        fetches the whole step, agrees on bad samples across all ranks and drops them; ``raise``: a lazy stream."""
        if self.on_bad_sample == "raise":
            self._flags.zero_()
            return None if self._iter is None else self._stream(step)
        flags = torch.zeros(self.dp_size, self.gas, self.m, dtype=torch.int32)
        fetched: list[list[Fetched]] = []
        self._fetched_tokens.clear()
        if self._iter is not None:
            for mb in range(self.gas):
                batch = next(self._iter)
                self._note_tokens(batch)
                fetched.append(batch)
                for slot, f in enumerate(batch):
                    if f.error is not None:
                        flags[self.dp_rank, mb, slot] = 1
        flags = flags.to(self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = self._flags = flags.cpu()
        if bool(flags.any()):
            mine = [(self.dp_rank, mb, slot, self._record_id(f), f.error)
                    for mb, batch in enumerate(fetched) for slot, f in enumerate(batch) if f.error is not None]
            gathered: list[list | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            reasons: dict[tuple[int, int, int], tuple[str, str]] = {}
            for rows in gathered:
                for r, mb, slot, rid, err in rows or []:
                    # The first stage's reason (media) is more complete than the label-only stage's; keep the longer.
                    if len(err) > len(reasons.get((r, mb, slot), ("", ""))[1]):
                        reasons[(r, mb, slot)] = (rid, err)
            lines = [f"step {step + 1}, dp rank {r}, micro-batch {mb}: record {rid}: {err}"
                     for (r, mb, slot), (rid, err) in sorted(reasons.items())]
            for _, (rid, err) in sorted(reasons.items()):
                self.skipped.append((step + 1, rid, err.split(":", 1)[0]))
            for r in range(self.dp_size):
                for mb in range(self.gas):
                    if bool(flags[r, mb].all()):
                        raise BadSampleError(
                            f"every sample of micro-batch {mb} of step {step + 1} on dp rank {r} is bad; a "
                            "micro-batch cannot be empty:\n  " + "\n  ".join(lines))
            if dist.get_rank() == 0:
                for line in lines:
                    logger.warning("skipped %s", line)
        if self._iter is None:
            return None
        assert self.collate is not None  # given with the dataset, as _iter is
        out = []
        for mb, batch in enumerate(fetched):
            keep = [f.sample for slot, f in enumerate(batch)
                    if not flags[self.dp_rank, mb, slot] and f.sample is not None]  # unflagged: sample is set
            out.append(self.collate(keep))
        return out

    def _record_id(self, f: Fetched) -> str:
        assert self.dataset is not None  # only ranks with a dataset fetch samples
        return self.dataset.records[f.key[0]].id

    def _stream(self, step: int) -> Iterator[MicroBatch]:
        assert self._iter is not None and self.collate is not None  # next_step streams only where they are set
        self._fetched_tokens.clear()
        for mb in range(self.gas):
            batch = next(self._iter)
            self._note_tokens(batch)
            bad = [f"step {step + 1}, dp rank {self.dp_rank}, micro-batch {mb}: record "
                   f"{self._record_id(f)}: {f.error}" for f in batch if f.error is not None]
            if bad:
                raise BadSampleError(
                    "bad training sample(s) (data.on_bad_sample=raise; fix the data, run `python -m lavis.data.check`"
                    ", or set data.on_bad_sample=skip):\n  " + "\n  ".join(bad))
            yield self.collate([f.sample for f in batch if f.sample is not None])  # no error: sample is set

    def _note_tokens(self, batch: list[Fetched]) -> None:
        for f in batch:
            if f.sample is not None:
                self._fetched_tokens[f.key[0]] = len(f.sample.input_ids)

    def step_tokens(self, step: int) -> int:
        """Non-pad tokens of the samples the last :meth:`next_step` kept, over all DP ranks (needs the sampler):
        this rank's samples as fetched, the other replicas' from the dataset's ``num_tokens``."""
        assert self.sampler is not None and self.dataset is not None, "step_tokens needs the sampler and dataset"
        keys = self.sampler.step_keys(step)
        dataset, fetched = self.dataset, self._fetched_tokens
        return sum(fetched[i] if i in fetched else dataset.num_tokens(i) for mb, ranks in enumerate(keys)
                   for r, rank in enumerate(ranks) for slot, (i, _) in enumerate(rank) if not self._flags[r, mb, slot])

    def step_skips(self, step: int) -> int:
        return sum(1 for s, _, _ in self.skipped if s == step + 1)

    def close(self) -> None:
        """End the data-loader workers now. They ignore SIGTERM (so a scheduler's signal to every process of the job
        does not kill them mid-step), so Python's exit-time ``terminate()`` would not end them; workers still alive
        after the normal shutdown are killed. Uses DataLoader iterator internals (``_workers``,
        ``_shutdown_workers``), checked against torch 2.14."""
        it, self._iter = self._iter, None
        workers = list(getattr(it, "_workers", []))
        if isinstance(it, _MultiProcessingDataLoaderIter):  # the only iterator with workers
            it._shutdown_workers()
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()

    def summary(self) -> str:
        """One line: skipped samples by reason, or empty when none."""
        if not self.skipped:
            return ""
        counts = Counter(reason for _, _, reason in self.skipped)
        ids = ", ".join(rid for _, rid, _ in self.skipped[:20]) + (" ..." if len(self.skipped) > 20 else "")
        return (f"skipped {len(self.skipped)} bad sample(s) (data.on_bad_sample=skip): "
                + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; records: {ids}")
