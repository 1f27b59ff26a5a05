"""The chat-template table: the one owner of every template's rendering rules, system prompt, stop sequences, answer
cut rule and media (placeholder) policy.

Everything that renders or generates reads this table: ``lavis.data.conversation`` (training ids, labels and chat
prompts), ``lavis.chat.stops`` (stopping criteria, final answer text), the config schema (``model.llm.template`` is a
``Literal`` over the table's names) and the dataset checker. Adding a template is one :data:`TEMPLATES` entry plus
its golden test (``tests/test_templates.py``).

A template is a sequence of segments. Each :class:`Seg` is one tokenisation unit (the text is tokenised on its own,
special-token text becomes its id) with a label rule; ``{system}``, ``{query}`` and ``{answer}`` are filled in (never
with ``str.format``: user text may hold braces). ``{system}`` becomes ``system_format`` filled with the system prompt,
or nothing when the prompt is empty. Rendering order::

    begin, system block (if any), then per (query, answer) pair:
        first_user (first pair, else user), assistant (last_assistant for the last pair), answer

A chat prompt is the same rendering stopped after the last pair's ``assistant`` segments, so a prompt is always a
prefix of the training rendering of the conversation it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Train = Literal["no", "yes", "mpp"]
"""Label rule of a segment: never trained, always trained, or trained only in ``label_mode: mpp`` (ChatML's
``<|im_start|>``, ``<|im_end|>`` and the newline after it, as MPP-Qwen / QwenLM ``finetune.py`` train them)."""


@dataclass(frozen=True)
class Seg:
    text: str
    train: Train = "no"


@dataclass(frozen=True)
class TemplateSpec:
    """One chat template. Segment texts spell special tokens as text (``<s>``, ``<|im_start|>``)."""

    description: str
    system_prompt: str
    """The template's conventional system prompt (used when ``model.llm.system_prompt`` is null)."""
    user: tuple[Seg, ...]
    """Every user turn (holds ``{query}``); with ``first_user`` set, every user turn but the first."""
    answer: tuple[Seg, ...]
    """The answer and its end token (holds ``{answer}``)."""
    begin: tuple[Seg, ...] = ()
    """Once at the start (a BOS token)."""
    system: tuple[Seg, ...] = ()
    """The system block, rendered once after ``begin``; skipped when the system prompt is empty and
    ``system_if_empty`` is false."""
    system_if_empty: bool = False
    system_format: str = "{system}"
    """What ``{system}`` becomes for a non-empty system prompt."""
    first_user: tuple[Seg, ...] | None = None
    """The first user turn when it differs (it may hold ``{system}``)."""
    assistant: tuple[Seg, ...] = ()
    """Start of every answer; a chat prompt ends here."""
    last_assistant: tuple[Seg, ...] | None = None
    """Start of the last answer when it differs (Qwen3's empty think block)."""
    strip: bool = False
    """Strip query and answer text (Meta's LLaMA templates do)."""
    stop_tokens: tuple[str, ...] = ()
    """Special tokens that end an answer; the first is the trained end token."""
    stop_texts: tuple[str, ...] = ()
    """Plain-text stop strings (listed before ``stop_tokens`` in the stop sequences); each is matched as every
    token sequence the tokenizer gives it (at a word start and inside a word: LLaMA's ``###`` is ``[835]`` or
    ``[2277, 29937]``)."""
    cut_before: tuple[str, ...] = ()
    """Final answer text: keep what precedes the first occurrence of each (MiniGPT-4: ``###``)."""
    cut_after: tuple[str, ...] = ()
    """Then keep what follows the last occurrence of each (MiniGPT-4: ``Assistant:``), then strip."""
    media_open: str = "<Img>"
    media_close: str = "</Img>"
    """Each ``<image>`` (or ``<video>``) marker becomes ``media_open`` + placeholder ids + ``media_close``."""
    max_length: int | None = None
    """Chat: prompt + answer tokens; the oldest prompt embeddings beyond it are dropped (MiniGPT-4's demo: 2000)."""
    media_sep: str = " "
    """Between a chat turn's media markers and its text (MPP-Qwen's cli joins them directly; MiniGPT-4 with a
    space)."""


def _chatml_turn(role: str, field: str) -> tuple[Seg, ...]:
    return (Seg("<|im_start|>", "mpp"), Seg(role), Seg("\n"), Seg(field), Seg("<|im_end|>", "mpp"), Seg("\n", "mpp"))


_CHATML_ASSISTANT = (Seg("<|im_start|>", "mpp"), Seg("assistant"), Seg("\n"))
_CHATML_ANSWER = (Seg("{answer}", "yes"), Seg("<|im_end|>", "yes"), Seg("\n", "mpp"))
_MINIGPT4_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
                    "provide it to you. Please answer my questions.")
_MINIGPT4_CUT = {"cut_before": ("###",), "cut_after": ("Assistant:",), "max_length": 2000}

TEMPLATES: dict[str, TemplateSpec] = {
    "chatml": TemplateSpec(
        description="Qwen v1 / MPP-Qwen ChatML, MPP-Qwen's piecewise tokenisation and masking",
        system_prompt="You are a helpful assistant.",
        system=_chatml_turn("system", "{system}"), system_if_empty=True,
        user=_chatml_turn("user", "{query}"), assistant=_CHATML_ASSISTANT, answer=_CHATML_ANSWER,
        stop_tokens=("<|im_end|>", "<|im_start|>"), media_sep="",
    ),
    "qwen3": TemplateSpec(
        description="Qwen3 ChatML, non-thinking: the last answer starts with an empty think block, as Qwen3's "
                    "chat template renders it (and its generation prompt with enable_thinking=False); no system "
                    "block unless a system prompt is set",
        system_prompt="",
        system=_chatml_turn("system", "{system}"),
        user=_chatml_turn("user", "{query}"), assistant=_CHATML_ASSISTANT,
        last_assistant=(*_CHATML_ASSISTANT, Seg("<think>\n\n</think>\n\n")), answer=_CHATML_ANSWER,
        stop_tokens=("<|im_end|>", "<|endoftext|>"), media_sep="",
    ),
    "llama3": TemplateSpec(
        description="Meta LLaMA-3.x instruct: header ids around the role, <|eot_id|> after every message, text "
                    "stripped; no system block unless a system prompt is set (3.1's date lines are not added)",
        system_prompt="",
        begin=(Seg("<|begin_of_text|>"),),
        system=(Seg("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"),),
        user=(Seg("<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|>"),),
        assistant=(Seg("<|start_header_id|>assistant<|end_header_id|>\n\n"),),
        answer=(Seg("{answer}", "yes"), Seg("<|eot_id|>", "yes")), strip=True,
        stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    ),
    "vicuna_v0": TemplateSpec(
        description="MiniGPT-4's Vicuna v0 demo conversation: [S]{sys}###Human: <u>###Assistant: <a>###",
        system_prompt=_MINIGPT4_SYSTEM,
        begin=(Seg("<s>"),),
        first_user=(Seg("{system}###Human: {query}###Assistant: "),),
        user=(Seg("Human: {query}###Assistant: "),),
        answer=(Seg("{answer}###", "yes"),),
        stop_texts=("###",), stop_tokens=("</s>",), **_MINIGPT4_CUT,
    ),
    "minigpt4_vicuna": TemplateSpec(
        description="MiniGPT-4 stage-2 training (Vicuna v0): [S]###Human: <u> ###Assistant: <a>###, no system "
                    "prompt (its prompt_template '###Human: {} ###Assistant: ', end_sym '###')",
        system_prompt="",
        begin=(Seg("<s>"),),
        first_user=(Seg("{system}###Human: {query} ###Assistant: "),),
        user=(Seg("Human: {query} ###Assistant: "),),
        answer=(Seg("{answer}###", "yes"),),
        stop_texts=("###",), stop_tokens=("</s>",), **_MINIGPT4_CUT,
    ),
    "minigpt4_llama2": TemplateSpec(
        description="MiniGPT-4 LLaMA-2: [S]{sys}<s>[INST] <u> [/INST] <a></s> (its demo's prompt; with "
                    "system_prompt '' this is its stage-2 training layout '[INST] {} [/INST] ', end_sym '</s>')",
        system_prompt=_MINIGPT4_SYSTEM, system_format="{system}<s>",
        begin=(Seg("<s>"),),
        first_user=(Seg("{system}[INST] {query} [/INST] "),),
        user=(Seg("<s>[INST] {query} [/INST] "),),
        answer=(Seg("{answer}</s>", "yes"),),
        stop_texts=("###",), stop_tokens=("</s>",), **_MINIGPT4_CUT,  # its demo stops at '###' too
    ),
    "vicuna_v1_1": TemplateSpec(
        description="FastChat vicuna_v1.1: [S]{sys} USER: <u> ASSISTANT: <a>[/S]",
        system_prompt=("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                       "helpful, detailed, and polite answers to the user's questions."),
        begin=(Seg("<s>"),),
        first_user=(Seg("{system} USER: {query} ASSISTANT:"),),
        user=(Seg("USER: {query} ASSISTANT:"),),
        answer=(Seg(" {answer}", "yes"), Seg("</s>", "yes")),
        stop_tokens=("</s>",),
    ),
    "llama2": TemplateSpec(
        description="Meta LLaMA-2 chat: [S][INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n<u> [/INST] <a> [/S] per turn",
        system_prompt="", system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
        first_user=(Seg("<s>"), Seg("[INST] {system}{query} [/INST]")),
        user=(Seg("<s>"), Seg("[INST] {query} [/INST]")),
        answer=(Seg(" {answer} ", "yes"), Seg("</s>", "yes")), strip=True,
        stop_tokens=("</s>",),
    ),
}

TemplateName = Literal[
    "chatml", "qwen3", "llama3", "vicuna_v0", "minigpt4_vicuna", "minigpt4_llama2", "vicuna_v1_1", "llama2"
]
"""``model.llm.template``: any key of :data:`TEMPLATES` (written out for the type checker; a test keeps them equal)."""


def get_template(name: str) -> TemplateSpec:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {sorted(TEMPLATES)} "
                         "(lavis/data/templates.py)")
    return TEMPLATES[name]
