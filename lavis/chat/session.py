"""One terminal conversation over the stateless :class:`ChatEngine`: history, pending media, settings, stop token."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lavis.chat.engine import ChatEngine, GenerationSettings, Media, Turn


@dataclass
class ChatSession:
    """What the CLI (and the demo's evaluation) keeps between questions; the engine keeps none of it."""

    engine: ChatEngine
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[Turn] = field(default_factory=list)
    pending: list[Media] = field(default_factory=list)
    """Media waiting for the next query."""
    stop_event: threading.Event = field(default_factory=threading.Event)
    """Set (e.g. by Ctrl-C) to end the answer being generated; cleared when the next answer starts."""

    def attach_image(self, path: str | Path) -> None:
        """Decode now (errors surface at once, naming the file); the image joins the next query."""
        self.pending.append(self.engine.load_media(path, video=False))

    def attach_video(self, path: str | Path) -> None:
        self.pending.append(self.engine.load_media(path, video=True))

    def clear_history(self) -> None:
        self.history.clear()

    def clear(self) -> None:
        self.history.clear()
        self.pending.clear()

    def ask(self, query: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``query`` (with any pending media), append the turn to the history, return the answer."""
        turn = self.engine.make_turn(query, self.pending)
        self.stop_event.clear()
        ans = self.engine.generate(self.history + [turn], self.settings, self.stop_event, on_text)
        turn.answer, turn.stopped = ans.text, ans.stopped
        self.history.append(turn)
        self.pending.clear()
        return turn.answer

    def regenerate(self, on_text: Callable[[str], None] | None = None) -> str:
        if not self.history:
            raise ValueError("nothing to regenerate: the history is empty")
        last = self.history[-1]
        self.stop_event.clear()
        ans = self.engine.generate(self.history[:-1] + [replace(last, answer=None)], self.settings, self.stop_event,
                                   on_text)
        last.answer, last.stopped = ans.text, ans.stopped
        return last.answer
