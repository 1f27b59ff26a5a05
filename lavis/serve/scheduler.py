"""A bounded queue of generation jobs and the one worker thread that runs the model, batching where it can.

The worker takes the oldest job, then (``max_batch`` > 1) every queued job that can share its decode (same
settings, no seed) up to ``max_batch``, and answers them with one :meth:`ChatEngine.run`: prompts left-padded,
each sequence ending on its own. A job whose client went away has its cancel token set: it ends at its next token
(or is skipped if it has not started) and the others in its batch go on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

from lavis.chat.engine import Answer, ChatEngine, GenerationSettings, Request


@dataclass
class Job:
    request: Request
    settings: GenerationSettings
    done: Callable[[Answer | Exception], None]
    """Called once from the worker thread with the answer or the error."""
    seed: int | None = None

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can be decoded together (None: this one runs alone)."""
        if self.seed is not None or self.settings.num_beams > 1:
            return None
        return astuple(self.settings)[1:]  # all but max_new_tokens, which each request carries itself


@dataclass
class Stats:
    served: int = 0
    batches: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"served": self.served, "batches": self.batches, "largest_batch": self.largest_batch,
                    "cancelled": self.cancelled}


class Scheduler:
    def __init__(self, engine: ChatEngine, max_queue: int, max_batch: int) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"--max-queue and --max-batch must be >= 1, got {max_queue} and {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.held: list[Job] = []
        """Taken from the queue while forming a batch they could not join; they go first next time."""
        self.stats = Stats()
        self.thread = threading.Thread(target=self._work, name="generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``queue.Full`` when ``max_queue`` jobs are already waiting."""
        self.jobs.put_nowait(job)

    def waiting(self) -> int:
        return self.jobs.qsize() + len(self.held)

    def next_batch(self) -> list[Job]:
        first = self.held.pop(0) if self.held else self.jobs.get()
        batch, key = [first], first.batch_key()
        if key is None:
            return batch
        for job in list(self.held):
            if len(batch) < self.max_batch and job.batch_key() == key:
                self.held.remove(job)
                batch.append(job)
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            (batch if job.batch_key() == key else self.held).append(job)
        return batch

    def _work(self) -> None:
        while True:
            batch = self.next_batch()
            live = []
            for job in batch:
                if job.request.cancel is not None and job.request.cancel.is_set():
                    self._count(cancelled=1)
                    job.done(RuntimeError("cancelled before it started"))
                else:
                    live.append(job)
            if live:
                self.run(live)

    def run(self, jobs: list[Job]) -> None:
        try:
            answers = self.engine.run([j.request for j in jobs], jobs[0].settings, seed=jobs[0].seed)
        except (ValueError, RuntimeError) as e:  # e.g. the prompt outgrew the context: each client is told
            for job in jobs:
                job.done(e)
            return
        except BaseException as e:  # anything else: the clients are told, then it propagates (stack trace in the log)
            for job in jobs:
                job.done(RuntimeError(f"generation failed: {type(e).__name__}: {e}"))
            raise
        self._count(served=len(jobs), batches=1, size=len(jobs),
                    cancelled=sum(a.finish_reason == "cancelled" for a in answers))
        for job, ans in zip(jobs, answers, strict=True):
            job.done(ans)

    def _count(self, served: int = 0, batches: int = 0, size: int = 0, cancelled: int = 0) -> None:
        with self.stats.lock:
            self.stats.served += served
            self.stats.batches += batches
            self.stats.largest_batch = max(self.stats.largest_batch, size)
            self.stats.cancelled += cancelled
