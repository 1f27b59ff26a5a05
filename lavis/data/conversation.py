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

Templates (``model.llm.template``): the table in ``lavis/data/templates.py`` owns every template's segments, system
prompt, stop sequences, answer cut rule and media policy; :func:`_build` is the one renderer that reads it.

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

from lavis.config.schema import TemplateName
from lavis.data.templates import (
    IMAGE_MARKER,
    TEMPLATES,
    VIDEO_MARKER,
    Seg,
    TemplateSpec,
    get_template,
)
from lavis.data.tokenizer import LLAMA_IMAGE_PLACEHOLDER, AnyTokenizer, SentencePieceTokenizer

if TYPE_CHECKING:
    from lavis.config.schema import Config

IGNORE_INDEX = -100
LabelMode = Literal["mpp", "assistant"]

SYSTEM_PROMPTS: dict[str, str] = {name: spec.system_prompt for name, spec in TEMPLATES.items()}
"""Each template's conventional system prompt (read from the template table)."""

_MARKER_RE = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
_FIELD_RE = re.compile(r"\{(system|query|answer)\}")


class SampleError(ValueError):
    """A record cannot be turned into a training sample; the message names the record."""


@dataclass(frozen=True)
class ChatTemplate:
    """A template of the table bound to a tokenizer, a system prompt and the image-token counts."""

    tokenizer: AnyTokenizer
    system_prompt: str
    placeholder: str
    num_query: int
    num_video_frames: int
    name: TemplateName = "chatml"

    def __post_init__(self) -> None:
        get_template(self.name)  # unknown names fail here, naming the choices

    @property
    def spec(self) -> TemplateSpec:
        return TEMPLATES[self.name]

    @property
    def placeholder_id(self) -> int:
        tok = self.tokenizer
        try:
            return tok.token_id(self.placeholder)
        except KeyError:
            raise ValueError(
                f"model.llm.image_placeholder {self.placeholder!r} is not one token of the tokenizer {tok.source}; "
                f"for this tokenizer use {default_image_placeholder(tok)!r}") from None

    def special_ids(self) -> SpecialIds:
        """The one owner of the pad, end and image-placeholder ids of a run (training, evaluation, chat, checker).

        - placeholder: ``model.llm.image_placeholder``, which must be one token of this tokenizer;
        - eos: the template's trained end token (its first ``stop_tokens`` entry: ``<|im_end|>``, ``</s>``,
          ``<|eot_id|>``);
        - pad: the tokenizer's own pad token (Qwen v1: ``<|endoftext|>`` as QwenLM/MPP-Qwen pad; a Vicuna v0 delta's
          ``[PAD]``; Qwen2.5/3's ``tokenizer_config.json``: ``<|endoftext|>``), else the eos, as MiniGPT-4 first did
          (Meta's LLaMA / LLaMA-2, Llama-3 have none). Never the placeholder (LLaMA's ``<unk>``): a pad there would
          count as an image slot. Pad positions carry label -100 and attention 0, so the choice never changes a
          loss or an answer.
        """
        tok = self.tokenizer
        placeholder = self.placeholder_id
        end = self.spec.stop_tokens[0]
        try:
            eos = tok.token_id(end)
        except KeyError:
            raise ValueError(f"model.llm.template {self.name!r} ends answers with {end!r}, which is not a token of "
                             f"the tokenizer {tok.source}; pick the template of this model family "
                             "(lavis/data/templates.py)") from None
        if eos == placeholder:
            raise ValueError(f"model.llm.image_placeholder {self.placeholder!r} is the template's end token; use "
                             f"{default_image_placeholder(tok)!r}")
        pad = eos
        declared = getattr(tok, "pad_token", None)
        if declared is not None:
            try:
                pad = tok.token_id(declared)
            except KeyError:
                raise ValueError(f"the tokenizer {tok.source} declares pad token {declared!r}, which is not one of "
                                 "its tokens (special_tokens_map.json / tokenizer_config.json beside it)") from None
            if pad == placeholder:
                pad = eos
        return SpecialIds(pad, eos, placeholder)

    def stop_sequences(self) -> list[list[int]]:
        """Token sequences that end an answer, the trained end first: every encoding of each stop text (at a word
        start and inside a word, e.g. LLaMA's ``###`` = ``[835]`` or ``[2277, 29937]``), then each stop token."""
        tok = self.tokenizer
        out: list[list[int]] = []
        for text in self.spec.stop_texts:
            ctx = tok.encode("a")
            inside = tok.encode("a" + text)
            for v in [tok.encode(text), inside[len(ctx):] if inside[:len(ctx)] == ctx else []]:
                if v and v not in out:
                    out.append(v)
        return out + [[tok.token_id(t)] for t in self.spec.stop_tokens]

    def stop_token_ids(self) -> list[int]:
        """The single-token stop sequences (the first is the trained end token where it is a single token)."""
        return [seq[0] for seq in self.stop_sequences() if len(seq) == 1]

    def cut_answer(self, text: str) -> str:
        """The final answer text as the predecessor cuts it (MiniGPT-4: before ``###``, after ``Assistant:``)."""
        for sep in self.spec.cut_before:
            text = text.split(sep)[0]
        for sep in self.spec.cut_after:
            text = text.split(sep)[-1]
        return text.strip()


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    placeholder: int


IMAGE_PLACEHOLDERS = ("<|extra_0|>", "<|image_pad|>", "<|reserved_special_token_0|>")
"""Image placeholders of the families, in order of preference (Qwen v1 and the demo, Qwen2.5/3, Llama-3); a
sentencepiece (LLaMA / Vicuna) tokenizer uses ``<unk>`` (``LLAMA_IMAGE_PLACEHOLDER``)."""


def default_image_placeholder(tok: AnyTokenizer) -> str:
    """The image placeholder of the family ``tok`` belongs to (the presets' ``model.llm.image_placeholder``)."""
    if isinstance(tok, SentencePieceTokenizer):
        return LLAMA_IMAGE_PLACEHOLDER
    for token in IMAGE_PLACEHOLDERS:
        if tok.is_special(token):
            return token
    return LLAMA_IMAGE_PLACEHOLDER if tok.is_special(LLAMA_IMAGE_PLACEHOLDER) else IMAGE_PLACEHOLDERS[0]


def template_from_config(tok: AnyTokenizer, cfg: Config) -> ChatTemplate:
    """The one place a run's template is built from its config (training, chat, bench, checker)."""
    llm = cfg.model.llm
    system = SYSTEM_PROMPTS[llm.template] if llm.system_prompt is None else llm.system_prompt
    return ChatTemplate(tok, system, llm.image_placeholder, cfg.model.num_image_tokens,
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
    """Tokenise text whose markers become the template's ``media_open`` + placeholder ids + ``media_close``
    (``<Img>`` ... ``</Img>`` in every template so far); returns (ids, media count)."""
    tok = tpl.tokenizer
    ph = tpl.placeholder_id
    ids: list[int] = []
    pending = ""
    num_media = 0
    for part in _MARKER_RE.split(text):
        if part == IMAGE_MARKER or part == VIDEO_MARKER:
            frames = 1 if part == IMAGE_MARKER else tpl.num_video_frames
            ids += tok.encode(pending + tpl.spec.media_open) + [ph] * (tpl.num_query * frames)
            pending = tpl.spec.media_close
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


def _fill(text: str, values: dict[str, str]) -> str:
    return _FIELD_RE.sub(lambda m: values[m.group(1)], text)


def _build(pairs: list[tuple[str, str | None]], tpl: ChatTemplate, label_mode: LabelMode) -> _Builder:
    """Render (query, answer) pairs by the template table; an answer of None (last pair only) ends the ids where
    generation starts. The only renderer: training, chat prompts and the checker all come here."""
    b = _Builder(tpl)
    spec = tpl.spec
    system = _fill(spec.system_format, {"system": tpl.system_prompt}) if tpl.system_prompt else ""

    def emit(segs: tuple[Seg, ...], **values: str) -> None:
        for seg in segs:
            text = _fill(seg.text, values)
            if text:
                b.add(text, seg.train == "yes" or (seg.train == "mpp" and label_mode == "mpp"))

    emit(spec.begin)
    if spec.system and (tpl.system_prompt or spec.system_if_empty):
        emit(spec.system, system=system)
    for i, (query, answer) in enumerate(pairs):
        first = i == 0 and spec.first_user is not None
        emit(spec.first_user if first else spec.user, system=system if i == 0 else "",  # type: ignore[arg-type]
             query=query.strip() if spec.strip else query)
        last = i == len(pairs) - 1 and spec.last_assistant is not None
        emit(spec.last_assistant if last else spec.assistant)  # type: ignore[arg-type]
        if answer is not None:
            emit(spec.answer, answer=answer.strip() if spec.strip else answer)
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
