"""Canonical conversations -> token ids, labels and image-placeholder runs (pure functions).

Canonical record (DATA.md)::

    {"id": "...", "images": ["a.jpg", ...] | "video": "v.mp4",
     "conversations": [{"role": "user", "content": "<image>\\nWhat is in the image?"},
                       {"role": "assistant", "content": "A red circle."}, ...]}

Each ``<image>`` marker stands for the next entry of ``images``; ``<video>`` for the clip. In every template a
marker expands to ``<Img>`` + ``num_query`` placeholder tokens (per frame for video) + ``</Img>``, exactly the text
MPP-Qwen and MiniGPT-4 build from ``<Img><ImageHere></Img>``; the model later overwrites the placeholder positions
with the projected Q-Former outputs, in order. Text is tokenised piecewise (the predecessors do the same): the text
before a run ends with ``<Img>``, the run is inserted as ids, the text after starts with ``</Img>``. For tokenizers
that split special tokens out first (Qwen's tiktoken, ``tokenizers``) this equals tokenising the whole string; it
also works for sentencepiece tokenizers that cannot parse special-token text.

Templates (``model.llm.template``), with ``<u>``/``<a>`` a user/assistant turn and ``[S]``/``[/S]`` BOS/EOS ids:

- ``chatml`` (Qwen, MPP-Qwen): ``<|im_start|>system\\n{sys}<|im_end|>\\n`` then per turn
  ``<|im_start|>user\\n<u><|im_end|>\\n<|im_start|>assistant\\n<a><|im_end|>\\n``.
- ``vicuna_v0`` (MiniGPT-4's demo conversation, FORMATS.md section 7): ``[S]{sys}###Human: <u>###Assistant: <a>###``
  then ``Human: <u>###Assistant: <a>###`` per further turn; ``###`` is MiniGPT-4's ``end_sym`` and is trained.
- ``vicuna_v1_1`` (FastChat): ``[S]{sys} USER: <u> ASSISTANT: <a>[/S]`` then ``USER: <u> ASSISTANT: <a>[/S]``.
- ``llama2`` (Meta's chat format): per turn ``[S][INST] <u> [/INST] <a> [/S]``; a non-empty system prompt goes into
  the first user turn as ``<<SYS>>\\n{sys}\\n<</SYS>>\\n\\n``. User and answer text are stripped as Meta does.

Labels (``label_mode``), unshifted (the model shifts):
- ``mpp`` (default, MPP-Qwen / QwenLM ``finetune.py``), ChatML: ``<|im_start|>``, ``<|im_end|>`` and the newline after
  it are trained in every turn (system and user too); role words, the newline after them and system/user content
  are masked; assistant content is trained.
- ``assistant``: only assistant content plus its end token (``<|im_end|>``, ``###`` or EOS) are trained.
- The Vicuna and LLaMA-2 templates train the assistant content plus its end token in both modes (MiniGPT-4 and
  FastChat mask everything else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lavis.data.tokenizer import IM_END, IM_START, TextTokenizer

if TYPE_CHECKING:
    from lavis.config.schema import Config

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
LabelMode = Literal["mpp", "assistant"]
TemplateName = Literal["chatml", "vicuna_v0", "vicuna_v1_1", "llama2"]

SYSTEM_PROMPTS: dict[str, str] = {
    "chatml": "You are a helpful assistant.",
    "vicuna_v0": (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to "
        "you. Please answer my questions."
    ),
    "vicuna_v1_1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    ),
    "llama2": "",
}
"""Each template's conventional system prompt (MPP-Qwen, MiniGPT-4 Vicuna0 demo, FastChat, MiniGPT-4 LLaMA-2)."""

_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


class SampleError(ValueError):
    """A record cannot be turned into a training sample; the message names the record."""


@dataclass(frozen=True)
class ChatTemplate:
    """What a template needs to know about the tokenizer and the image tokens."""

    tokenizer: TextTokenizer
    system_prompt: str
    placeholder: str
    num_query: int
    num_video_frames: int
    name: TemplateName = "chatml"
    bos_token: str = "<s>"
    """BOS/EOS token text of the LLaMA-family templates (unused by ChatML)."""
    eos_token: str = "</s>"

    def __post_init__(self) -> None:
        if self.name not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown chat template {self.name!r}; expected one of {sorted(SYSTEM_PROMPTS)}")

    @property
    def placeholder_id(self) -> int:
        return self.tokenizer.token_id(self.placeholder)

    def media_text(self, marker: str) -> str:
        run = self.placeholder * self.num_query
        if marker == IMAGE_MARKER:
            return f"<Img>{run}</Img>"
        return "<Img>" + run * self.num_video_frames + "</Img>"

    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated answer in this template (the first is the trained end token)."""
        tok = self.tokenizer
        if self.name == "chatml":
            return [tok.token_id(IM_END), tok.token_id(IM_START)]
        if self.name == "vicuna_v0":
            return tok.encode("###")[-1:] + [tok.token_id(self.eos_token)]
        return [tok.token_id(self.eos_token)]



def template_from_config(tok: TextTokenizer, cfg: Config) -> ChatTemplate:
    """The one place a run's template is built from its config (training, chat, bench, checker)."""
    llm = cfg.model.llm
    system = SYSTEM_PROMPTS[llm.template] if llm.system_prompt is None else llm.system_prompt
    return ChatTemplate(tok, system, llm.image_placeholder, cfg.model.qformer.num_query_tokens,
                        cfg.data.num_video_frames, name=llm.template)

@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_media: int
    """Image embeddings the sample needs: one per image, one per video frame."""


def count_markers(conversations: list[dict], record_id: str) -> tuple[int, int]:
    images = videos = 0
    for turn in conversations:
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(content, str):
            raise SampleError(f"record {record_id}: every turn needs a string `content` (got {content!r})")
        images += content.count(IMAGE_MARKER)
        videos += content.count(VIDEO_MARKER)
    return images, videos


def render_ids(text: str, tpl: ChatTemplate) -> tuple[list[int], int]:
    """Tokenise text whose markers become ``<Img>`` + placeholder ids + ``</Img>``; returns (ids, media count)."""
    tok = tpl.tokenizer
    ph = tpl.placeholder_id
    ids: list[int] = []
    pending = ""
    num_media = 0
    for part in _MARKER_RE.split(text):
        if part == IMAGE_MARKER or part == VIDEO_MARKER:
            frames = 1 if part == IMAGE_MARKER else tpl.num_video_frames
            ids += tok.encode(pending + "<Img>") + [ph] * (tpl.num_query * frames)
            pending = "</Img>"
            num_media += frames
        else:
            pending += part
    if pending:
        ids += tok.encode(pending)
    return ids, num_media


class _Builder:
    """Accumulates ids and labels; ``add(text, trained)`` tokenises text with its media runs."""

    def __init__(self, tpl: ChatTemplate) -> None:
        self.tpl = tpl
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.num_media = 0

    def add_ids(self, ids: list[int], trained: bool) -> None:
        self.ids += ids
        self.labels += list(ids) if trained else [IGNORE_INDEX] * len(ids)

    def add(self, text: str, trained: bool) -> None:
        ids, n = render_ids(text, self.tpl)
        self.num_media += n
        self.add_ids(ids, trained)


def _pairs(conversations: list[dict], record_id: str) -> list[tuple[str, str]]:
    expected = "user"
    out: list[tuple[str, str]] = []
    query = ""
    for i, turn in enumerate(conversations):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role != expected:
            raise SampleError(
                f"record {record_id}: turn {i} has role {role!r}, expected {expected!r} "
                "(turns alternate user/assistant, starting with user)"
            )
        if not isinstance(content, str):
            raise SampleError(f"record {record_id}: turn {i} `content` must be a string (got {content!r})")
        if role == "user":
            query = content
        else:
            if IMAGE_MARKER in content or VIDEO_MARKER in content:
                raise SampleError(f"record {record_id}: turn {i} (assistant) contains an image/video marker")
            out.append((query, content))
        expected = "assistant" if role == "user" else "user"
    if expected != "user":
        raise SampleError(f"record {record_id}: the conversation must end with an assistant turn")
    return out


def _build(pairs: list[tuple[str, str | None]], tpl: ChatTemplate, label_mode: LabelMode) -> _Builder:
    """Render (query, answer) pairs; an answer of None (last pair only) ends the ids where generation starts."""
    b = _Builder(tpl)
    tok = tpl.tokenizer
    name = tpl.name
    if name == "chatml":
        im_start, im_end = tok.token_id(IM_START), tok.token_id(IM_END)
        nl = tok.encode("\n")
        mpp = label_mode == "mpp"

        def head(role: str) -> None:
            b.add_ids([im_start], mpp)
            b.add_ids(tok.encode(role) + nl, False)

        def turn(role: str, content: str) -> None:
            head(role)
            b.add(content, role == "assistant")
            b.add_ids([im_end], mpp or role == "assistant")
            b.add_ids(nl, mpp)

        turn("system", tpl.system_prompt)
        for query, answer in pairs:
            turn("user", query)
            if answer is None:
                head("assistant")
            else:
                turn("assistant", answer)
        return b

    bos, eos = tok.token_id(tpl.bos_token), tok.token_id(tpl.eos_token)
    if name == "vicuna_v0":
        b.add_ids([bos], False)
        for i, (query, answer) in enumerate(pairs):
            prefix = tpl.system_prompt + "###" if i == 0 else ""
            b.add(f"{prefix}Human: {query}###Assistant: ", False)
            if answer is not None:
                b.add(answer + "###", True)
    elif name == "vicuna_v1_1":
        b.add_ids([bos], False)
        for i, (query, answer) in enumerate(pairs):
            prefix = tpl.system_prompt + " " if i == 0 else ""
            b.add(f"{prefix}USER: {query} ASSISTANT:", False)
            if answer is not None:
                b.add(" " + answer, True)
                b.add_ids([eos], True)
    elif name == "llama2":
        for i, (query, answer) in enumerate(pairs):
            sys_block = f"<<SYS>>\n{tpl.system_prompt}\n<</SYS>>\n\n" if i == 0 and tpl.system_prompt else ""
            b.add_ids([bos], False)
            b.add(f"[INST] {sys_block}{query.strip()} [/INST]", False)
            if answer is not None:
                b.add(f" {answer.strip()} ", True)
                b.add_ids([eos], True)
    else:  # ChatTemplate.__post_init__ rejects unknown names
        raise AssertionError(name)
    return b


def encode_conversation(
    conversations: list[dict],
    tpl: ChatTemplate,
    *,
    record_id: str,
    label_mode: LabelMode = "mpp",
) -> Encoded:
    """Render a canonical conversation with ``tpl``; return ids and labels (unshifted) of equal length."""
    b = _build(list(_pairs(conversations, record_id)), tpl, label_mode)
    return Encoded(b.ids, b.labels, b.num_media)


def encode_chatml(
    conversations: list[dict], tpl: ChatTemplate, *, record_id: str, label_mode: LabelMode = "mpp"
) -> Encoded:
    """:func:`encode_conversation` for a ChatML template (kept for callers that name the template)."""
    if tpl.name != "chatml":
        raise ValueError(f"encode_chatml got a {tpl.name!r} template; use encode_conversation")
    return encode_conversation(conversations, tpl, record_id=record_id, label_mode=label_mode)


def encode_prompt(turns: list[tuple[str, str | None]], tpl: ChatTemplate) -> list[int]:
    """Ids of a chat prompt: (query, answer) pairs, the last answer None (to be generated).

    Query text may contain ``<image>``/``<video>`` markers, expanded as in training. The result is the training
    rendering of the same conversation up to where the last answer starts (e.g. ``<|im_start|>assistant\\n``).
    """
    for i, (_, answer) in enumerate(turns):
        if answer is None and i != len(turns) - 1:
            raise ValueError("only the last turn may lack an answer")
    return _build(list(turns), tpl, "mpp").ids


LengthPolicy = Literal["truncate", "drop"]


def truncate(enc: Encoded, max_len: int, placeholder_id: int, record_id: str) -> Encoded:
    """Cut to ``max_len`` tokens without splitting an image run: only text after the last placeholder may go.

    A sample whose image placeholders themselves do not fit, or that would keep no trained token, raises
    :class:`SampleError` (never a silent corruption of the image/placeholder correspondence).
    """
    if len(enc.input_ids) <= max_len:
        return enc
    last_ph = max((i for i, t in enumerate(enc.input_ids) if t == placeholder_id), default=-1)
    if last_ph >= max_len:
        raise SampleError(
            f"record {record_id}: {len(enc.input_ids)} tokens with image placeholders up to position {last_ph}; "
            f"they do not fit data.max_txt_len={max_len}. Raise max_txt_len or use fewer frames/images."
        )
    labels = enc.labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError(
            f"record {record_id}: after truncation to data.max_txt_len={max_len} no answer token is left to train on"
        )
    return Encoded(enc.input_ids[:max_len], labels, enc.num_media)


def fit_length(enc: Encoded, max_len: int, placeholder_id: int, record_id: str, policy: LengthPolicy) -> Encoded:
    """Apply ``data.length_policy`` to an over-long sample: ``truncate`` (see :func:`truncate`) or ``drop``.

    ``drop`` raises :class:`TooLongError` for any sample over ``max_len``; both policies raise it (a
    :class:`SampleError`) when the media runs do not fit, so the training loop's ``on_bad_sample`` decides.
    """
    if len(enc.input_ids) <= max_len:
        return enc
    if policy == "drop":
        raise TooLongError(
            f"record {record_id}: {len(enc.input_ids)} tokens > data.max_txt_len={max_len} "
            "(data.length_policy=drop)"
        )
    try:
        return truncate(enc, max_len, placeholder_id, record_id)
    except SampleError as e:
        raise TooLongError(str(e)) from e


class TooLongError(SampleError):
    """A sample does not fit ``data.max_txt_len`` under the length policy."""
