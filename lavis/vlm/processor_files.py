"""The published processor facts of the Qwen2.5-VL / Qwen3-VL families, and processors built from them.

The added tokens (in id order after the regular BPE tokens) and the chat templates are those of the published
``Qwen/Qwen2.5-VL-*-Instruct`` and ``Qwen/Qwen3-VL-*-Instruct`` directories. :func:`build_processor` assembles
transformers' own processor classes from a byte-level BPE vocabulary: the real Qwen one
(``lavis.testing.synthetic_vlm`` converts ``qwen.tiktoken``), or the shapes demo's 512-token one
(:func:`write_shapes_processor`, so the tiny demo needs no download).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from transformers import (
    AddedToken,
    AutoProcessor,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from lavis.data.tokenizer import build_demo_tokenizer

QWEN_NUM_REGULAR = 151643
"""Regular (BPE) tokens of the Qwen vocabulary; the added tokens follow from this id on."""

_QWEN2_5_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)
_QWEN3_EXTRA: tuple[tuple[str, bool], ...] = (
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),  # 151668
)

ADDED_TOKENS: dict[str, tuple[tuple[str, bool], ...]] = {
    "qwen2_5_vl": _QWEN2_5_ADDED,
    "qwen3_vl": _QWEN2_5_ADDED + _QWEN3_EXTRA,
}
"""Per family: the published added tokens in id order (from 151643), each with its ``special`` flag."""

FAMILIES = tuple(ADDED_TOKENS)


def published_token_ids(family: str) -> dict[str, int]:
    """The published id of every added token of ``family`` (``<|image_pad|>`` -> 151655, ...)."""
    return {tok: QWEN_NUM_REGULAR + i for i, (tok, _) in enumerate(_added_tokens(family))}


def _added_tokens(family: str) -> tuple[tuple[str, bool], ...]:
    if family not in ADDED_TOKENS:
        raise ValueError(f"unknown VLM family {family!r}; known: {', '.join(FAMILIES)}")
    return ADDED_TOKENS[family]


# Qwen2.5-VL-*-Instruct `chat_template.json` (same as Qwen2-VL's): default system prompt, images and videos as
# `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the pad to the image's token count).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN3_VL_VISUAL_ITEMS = """\
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
"""

_QWEN3_VL_SYSTEM_TEXT = """\
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
"""

# Qwen3-VL-*-Instruct `chat_template.json`: no default system prompt, tools as in Qwen3, the same visual markers.
QWEN3_VL_CHAT_TEMPLATE = (
    """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
"""
    + _QWEN3_VL_SYSTEM_TEXT
    + """\
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
"""
    + _QWEN3_VL_SYSTEM_TEXT
    + """\
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
"""
    + _QWEN3_VL_VISUAL_ITEMS
    + """\
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
"""
    + _QWEN3_VL_VISUAL_ITEMS
    + """\
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
)

CHAT_TEMPLATES = {"qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}

def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], family: str) -> Qwen2Tokenizer:
    """transformers' ``Qwen2Tokenizer`` (Qwen's pre-tokenizer regex, NFC, byte-level) over ``vocab`` / ``merges``,
    then ``family``'s added tokens in published order (ids after the vocabulary; a token already in ``vocab`` keeps
    its id); eos ``<|im_end|>`` and pad ``<|endoftext|>`` as the published Instruct tokenizers."""
    # merges are pairs at runtime (tokenizers' BPE refuses "a b" strings, whatever the annotation says); unk_token
    # None as the published tokenizer_config.json
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|endoftext|>",  # type: ignore[arg-type]
                         pad_token="<|endoftext|>", unk_token=None)  # type: ignore[arg-type]
    # Every added token is registered, also one the vocabulary already holds (it keeps its id): as a plain vocabulary
    # entry the BPE would split ``<|im_end|>`` into characters, unlike the saved and reloaded tokenizer.
    for text, special in _added_tokens(family):
        tok.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
    tok.eos_token = "<|im_end|>"
    return tok


def _processor_parts(family: str, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if family == "qwen2_5_vl":
        return {"image_processor": Qwen2VLImageProcessor(size=size),
                "video_processor": Qwen2VLVideoProcessor(size=size)}
    # Qwen3-VL: 16 px patches, mean/std 0.5, its own video processor (timestamps, frame sampling on by default).
    qwen3 = {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return {"image_processor": Qwen2VLImageProcessor(size=size, **qwen3),
            "video_processor": Qwen3VLVideoProcessor(size=size, **qwen3)}


def build_processor(tokenizer: Qwen2Tokenizer, family: str, min_pixels: int,
                    max_pixels: int) -> Qwen2_5_VLProcessor | Qwen3VLProcessor:
    """``family``'s processor: ``tokenizer``, the published chat template, image and video processors with the pixel
    budget ``min_pixels``..``max_pixels`` (areas)."""
    _added_tokens(family)
    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen3VLProcessor
    return cls(tokenizer=tokenizer, chat_template=CHAT_TEMPLATES[family],
               **_processor_parts(family, min_pixels, max_pixels))


SHAPES_MIN_PIXELS = 28 * 28 * 4
SHAPES_MAX_PIXELS = 28 * 28 * 16
"""The demo's budget: a 64 x 64 shapes image keeps its size (56 x 56 after rounding to 28: 4 visual tokens)."""


def shapes_processor(family: str = "qwen2_5_vl") -> Qwen2_5_VLProcessor | Qwen3VLProcessor:
    """A ``family`` processor over the shapes demo's byte-level BPE (``builtin:shapes``: the regular tokens of the
    demo tokenizer, built locally and identical everywhere, then the family's added tokens not already in it)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = json.loads(build_demo_tokenizer().save_to(tmp).read_text(encoding="utf-8"))["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [_merge_pair(m) for m in model["merges"]]
    return build_processor(build_tokenizer(vocab, merges, family), family, SHAPES_MIN_PIXELS, SHAPES_MAX_PIXELS)


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    """One merge of a ``tokenizer.json`` (``"a b"`` or ``["a", "b"]``, by version) as a pair."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


def write_shapes_processor(directory: str | Path, family: str = "qwen2_5_vl") -> Path:
    """:func:`shapes_processor` saved into ``directory`` (``AutoProcessor.from_pretrained`` loads it)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    shapes_processor(family).save_pretrained(str(out))
    return out


BUILTIN_SHAPES = "builtin:shapes"


def load_processor(ref: str) -> Any:
    """``data.vlm.processor`` (or ``model.vlm.path``) -> the processor: ``builtin:shapes`` or a directory that
    ``AutoProcessor`` loads; a clear error naming the reference otherwise."""
    if ref == BUILTIN_SHAPES:
        return shapes_processor()
    path = Path(ref)
    if not path.is_dir():
        raise FileNotFoundError(f"VLM processor {ref!r}: not a directory (data.vlm.processor / model.vlm.path names "
                                f"a transformers model or processor directory, or {BUILTIN_SHAPES})")
    if not any((path / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise FileNotFoundError(f"VLM processor {ref!r}: no processor_config.json or preprocessor_config.json; copy "
                                "the processor files of the published model into it (or set data.vlm.processor)")
    return AutoProcessor.from_pretrained(str(path))

