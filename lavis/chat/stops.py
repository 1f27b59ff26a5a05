"""Generation support read from the template table: stopping on token sequences, the final answer text, and the
context window.

- Stops: a template's stop tokens and every token sequence of its stop texts (``ChatTemplate.stop_sequences``;
  Vicuna v0: ``[835]``, ``[2277, 29937]`` (``###``) and ``[2]`` (``</s>``) with LLaMA's vocabulary).
  :func:`stopping_criteria` ends generation when the generated ids end with any of them.
- Answer text: the generated ids up to the first stop sequence, decoded, then the template's cut rule (MiniGPT-4:
  the text before ``###``, after ``Assistant:``, stripped).
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


def context_start(prompt_len: int, max_new_tokens: int, max_length: int | None) -> int:
    """First prompt position kept so that prompt + answer fit ``max_length`` (MiniGPT-4: ``begin_idx =
    max(0, prompt_len + max_new_tokens - max_length)``; the oldest prompt embeddings are dropped). None: 0."""
    return 0 if max_length is None else max(0, prompt_len + max_new_tokens - max_length)
