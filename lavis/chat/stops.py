"""Generation support read from the template table: stopping on token sequences, the final answer text, and the
context window.

- Stops: a template's stop tokens and every token sequence of its stop texts (``ChatTemplate.stop_sequences``;
  Vicuna v0: ``[835]``, ``[2277, 29937]`` (``###``) and ``[2]`` (``</s>``) with LLaMA's vocabulary).
  :func:`stopping_criteria` ends generation when the generated ids end with any of them.
- Answer text: the generated ids up to the first stop sequence, decoded, then the template's cut rule (MiniGPT-4:
  the text before ``###``, after ``Assistant:``, stripped).
- Stop strings (a request's ``stop``): :class:`StopStrings` finds the first one in the answer text and how much of the
  text's end may still grow into one; each generated token costs time linear in the new text and the strings'
  lengths (only the tail that can hold a new match is searched), never quadratic in a string's length.
- Context window (MiniGPT-4's demo): prompt + answer must fit ``max_length`` tokens (the template's
  ``max_length``: 2000 for MiniGPT-4's templates, none for the others), so the oldest
  ``max(0, prompt_len + max_new_tokens - max_length)`` prompt embeddings are dropped before generating.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

from lavis.data.conversation import ChatTemplate


class StopOnSequences(StoppingCriteria):
    """Stops a sequence once its generated ids (after the prompt) end with one of ``sequences``."""

    def __init__(self, sequences: list[list[int]], prompt_len: int) -> None:
        self.sequences = [torch.tensor(s) for s in sequences if s]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = input_ids[:, self.prompt_len:]
        for seq in self.sequences:
            n = seq.numel()
            if generated.shape[1] >= n:
                done |= (generated[:, -n:] == seq.to(input_ids.device)).all(dim=1)
        return done


def stopping_criteria(tpl: ChatTemplate, prompt_len: int = 0) -> StopOnSequences:
    """The template's stop sequences as a transformers ``StoppingCriteria``. ``prompt_len``: ids of the prompt that
    ``generate`` returns in ``input_ids`` (0 when generating from ``inputs_embeds``, which returns only new ids)."""
    return StopOnSequences(tpl.stop_sequences(), prompt_len)


def first_stop(ids: list[int], sequences: list[list[int]]) -> int:
    """Index where the first stop sequence starts in ``ids`` (``len(ids)`` if none occurs)."""
    for end in range(1, len(ids) + 1):
        for seq in sequences:
            if seq and end >= len(seq) and ids[end - len(seq):end] == seq:
                return end - len(seq)
    return len(ids)


def answer_text(tpl: ChatTemplate, ids: list[int]) -> str:
    """Generated ids -> the answer: cut at the first stop sequence, decoded (special tokens dropped), then the
    template's cut rule applied (as the predecessor cuts it)."""
    cut = first_stop(ids, tpl.stop_sequences())
    return tpl.cut_answer(tpl.tokenizer.decode(ids[:cut]))


class StopStrings:
    """A request's stop strings matched against an answer text that grows token by token."""

    def __init__(self, strings: list[str]) -> None:
        self.strings = [s for s in strings if s]
        self.fail = [_prefix_function(s) for s in self.strings]
        self.longest = max(map(len, self.strings), default=0)
        self.text = ""
        self.start = 0
        """A stop string found in a longer ``self.text`` cannot start before this position (searched before)."""

    def first(self, text: str) -> int:
        """Where the first stop string starts in ``text`` (-1: none). Text that only grew since the last call is
        searched from its last ``longest - 1`` characters searched before on."""
        if not self.strings:
            return -1
        start = self.start if text.startswith(self.text) else 0
        found = min((i for i in (text.find(s, start) for s in self.strings) if i >= 0), default=-1)
        self.text, self.start = text, max(start, len(text) - self.longest + 1)
        if found >= 0:  # a match complete now stays the first unless a longer one completes before it
            self.start = min(self.start, found)
        return found

    def held(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of a stop string (a match may still complete)."""
        return max((_suffix_prefix(text[max(0, len(text) - len(s) + 1):], s, f) for s, f in zip(self.strings, self.fail)
                    if len(s) > 1), default=0)


def _prefix_function(s: str) -> list[int]:
    """Knuth-Morris-Pratt: ``fail[i]`` = length of the longest proper prefix of ``s[:i + 1]`` that ends it."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


def _suffix_prefix(tail: str, s: str, fail: list[int]) -> int:
    """Length of the longest end of ``tail`` that is a proper prefix of ``s`` (one pass over ``tail``)."""
    k = 0
    for c in tail:
        while k and (k == len(s) or c != s[k]):
            k = fail[k - 1]
        if c == s[k]:
            k += 1
    return fail[k - 1] if k == len(s) else k


def context_start(prompt_len: int, max_new_tokens: int, max_length: int | None) -> int:
    """First prompt position kept so that prompt + answer fit ``max_length`` (MiniGPT-4: ``begin_idx =
    max(0, prompt_len + max_new_tokens - max_length)``; the oldest prompt embeddings are dropped). None: 0."""
    return 0 if max_length is None else max(0, prompt_len + max_new_tokens - max_length)
