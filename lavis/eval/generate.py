"""The one place benchmark answers are generated: :func:`generate_answers`.

Each sample becomes a one-turn conversation built exactly as the chat front ends build it (``ChatEngine.make_turn``:
media markers, template), and ``batch_size`` of them are decoded together by ``ChatEngine.generate_batch`` (left
padding, each sequence stopping on its own end token or stop sequence, the template's answer cut); under greedy
decoding each answer is the one the sample gets alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from lavis.chat.engine import ChatEngine, GenerationSettings
from lavis.eval.common import Sample


def generate_answers(
    engine: ChatEngine, samples: Sequence[Sample], settings: GenerationSettings, batch_size: int
) -> list[str]:
    """One answer per sample, in order, generated ``batch_size`` at a time (greedy unless ``settings`` say)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        turns = [[engine.make_turn(s.query, [engine.load_media(p, video=s.video) for p in s.media])]
                 for s in samples[i:i + batch_size]]
        answers += [a.text for a in engine.generate_batch(turns, settings)]
    return answers
