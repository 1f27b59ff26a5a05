"""Tiny Qwen2.5-VL / Qwen3-VL processor directories written by transformers' own classes, for tests.

The tokenizer is the real Qwen vocabulary: the 151,643 byte-level BPE ranks of ``qwen.tiktoken`` (shared by Qwen v1,
Qwen2, Qwen2.5 and Qwen3) converted by transformers' ``TikTokenConverter`` into transformers' ``Qwen2Tokenizer`` (the
published tokenizer's pre-tokenizer regex, NFC normaliser and byte-level decoder), followed by the published added
tokens at their published ids. The chat templates are the published ones. Only the image/video pixel budgets are
small, so a test image of a few dozen pixels a side gives a handful of visual tokens.

``write_qwen_vl_processor(directory, tiktoken_path, family)`` saves the directory; ``AutoProcessor.from_pretrained``
loads it back as ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken
from transformers import (
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

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

TINY_MIN_PIXELS = 28 * 28 * 4
"""Smallest image the tiny processors accept before upscaling: 2 x 2 merged tokens at Qwen2.5-VL's 28 px."""
TINY_MAX_PIXELS = 28 * 28 * 64
"""Largest image before downscaling: 64 merged tokens (256 patches) at Qwen2.5-VL's 28 px."""


def qwen_vl_tokenizer(tiktoken_path: str | Path, family: str = "qwen2_5_vl") -> Qwen2Tokenizer:
    """transformers' ``Qwen2Tokenizer`` over the real Qwen ranks in ``tiktoken_path``, with ``family``'s added tokens
    at their published ids; eos ``<|im_end|>`` and pad ``<|endoftext|>`` as the published Instruct tokenizers."""
    path = Path(tiktoken_path)
    if not path.is_file():
        raise FileNotFoundError(f"Qwen vocabulary {path} not found (a qwen.tiktoken file of 151643 ranks)")
    vocab, merges = TikTokenConverter(str(path), pattern=PRETOKENIZE_REGEX).extract_vocab_merges_from_model(str(path))
    if len(vocab) != QWEN_NUM_REGULAR:
        raise ValueError(f"{path}: {len(vocab)} ranks, expected the Qwen vocabulary's {QWEN_NUM_REGULAR}")
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         unk_token=None, errors="replace")
    for text, special in _added_tokens(family)[1:]:  # <|endoftext|> is already 151643
        tok.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
    tok.eos_token = "<|im_end|>"
    return tok


def _processor_parts(family: str, min_pixels: int, max_pixels: int) -> dict:
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if family == "qwen2_5_vl":
        return {"image_processor": Qwen2VLImageProcessor(size=size),
                "video_processor": Qwen2VLVideoProcessor(size=size)}
    # Qwen3-VL: 16 px patches, mean/std 0.5, its own video processor (timestamps, frame sampling on by default).
    qwen3 = {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return {"image_processor": Qwen2VLImageProcessor(size=size, **qwen3),
            "video_processor": Qwen3VLVideoProcessor(size=size, **qwen3)}


def qwen_vl_processor(tiktoken_path: str | Path, family: str = "qwen2_5_vl", min_pixels: int = TINY_MIN_PIXELS,
                      max_pixels: int = TINY_MAX_PIXELS) -> Qwen2_5_VLProcessor | Qwen3VLProcessor:
    """The processor of ``family`` (tokenizer of :func:`qwen_vl_tokenizer`, published chat template, image and video
    processors with the pixel budget ``min_pixels``..``max_pixels``)."""
    tokenizer = qwen_vl_tokenizer(tiktoken_path, family)
    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen3VLProcessor
    return cls(tokenizer=tokenizer, chat_template=CHAT_TEMPLATES[family],
               **_processor_parts(family, min_pixels, max_pixels))


def write_qwen_vl_processor(directory: str | Path, tiktoken_path: str | Path, family: str = "qwen2_5_vl",
                            min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS) -> Path:
    """Save :func:`qwen_vl_processor` into ``directory`` (created) with ``save_pretrained``; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    qwen_vl_processor(tiktoken_path, family, min_pixels, max_pixels).save_pretrained(str(out))
    return out
