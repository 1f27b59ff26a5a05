"""One stateless chat engine for the CLI, the web UI and the API server: placement, media, prompts, generation.

The engine holds only the model and what is fixed with it (template, image transform, end tokens). Everything that
changes per call comes with the call: :meth:`ChatEngine.generate` takes the turns, the :class:`GenerationSettings`,
a cancel token (a ``threading.Event`` set by Ctrl-C, a web session's stop button or an API client that went away)
and a streaming callback. Conversation state lives with each front end (:class:`lavis.chat.session.ChatSession`
for the CLI, one ``Session`` per browser session in the web UI, one request in the API server).
:meth:`ChatEngine.generate_batch` answers many conversations in one batched decode (left padding, each sequence
stopping on its own); under greedy decoding each gets the tokens it gets alone.

The prompt is built by ``lavis.data.conversation.encode_prompt`` (the same ChatML rendering as training). Media
attached to a turn go where the user typed markers (``<image>``, ``<ImageHere>`` or ``<Img><ImageHere></Img>``, in
order, as MPP-Qwen places them; the number typed must equal the number attached), else as markers at the start of
that turn's query, one per image (then the text directly for ChatML, as MPP-Qwen-Next's ``cli_demo.py``; after a
space for the Vicuna / LLaMA-2 templates, as MiniGPT-4's demo); a video becomes one ``<video>`` marker, its frames
sampled as in training
(``data.num_video_frames``, ``data.video_fps``). Generation stops at the template's stop sequences
(``lavis/data/templates.py``, ``lavis/chat/stops.py``; ChatML: ``<|im_end|>`` / ``<|im_start|>`` / ``<|endoftext|>``;
Vicuna v0: ``###`` as ``[835]`` or ``[2277, 29937]``, ``</s>``; see :func:`answer_stop_ids`), the answer text is cut
by the template's rule (MiniGPT-4's: before ``###``, after ``Assistant:``) and MiniGPT-4's templates keep prompt +
answer within 2000 tokens by dropping the oldest prompt embeddings; a reply cut by ``max_new_tokens`` keeps its last
token (the predecessor drops it).

Placement: one device (bf16 on a GPU that supports it, fp32 on CPU); ``llm_device_map="auto"`` spreads the LLM's
decoder blocks over all visible GPUs with accelerate (vision, Q-Former, projection and token embeddings on the
first); ``load_8bit`` swaps the LLM's linear layers for bitsandbytes int8 ones (CUDA only).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from lavis.chat.stops import StopStrings, context_start
from lavis.config.load import load_config
from lavis.config.presets import model_types
from lavis.data import media
from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER, ChatTemplate, encode_prompt
from lavis.data.tokenizer import load_tokenizer, resolve_tokenizer_ref
from lavis.model.mllm import MultimodalLM
from lavis.pipeline.family import describe, family_named
from lavis.weights.load import load_model

__all__ = ["Answer", "ChatEngine", "ContextError", "GenerationSettings", "Media", "MediaMarkerError", "Request",
           "Turn", "add_model_arguments", "answer_stop_ids", "load_model", "place_media", "resolve_tokenizer_ref"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".gif")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    """Stop tokens are suppressed until this many tokens are generated (0: off)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    """> 1: beam search (the answer then arrives whole, not streamed)."""
    repetition_penalty: float = 1.0
    top_k: int = 0
    """Sampling: keep only the k most likely tokens (0: off)."""
    max_length: int | None = None
    """Prompt + answer tokens; a longer prompt loses its oldest embeddings. None = the template's (MiniGPT-4's
    templates: 2000, as its demo; others: no limit)."""


@dataclass
class Media:
    marker: str
    pixels: torch.Tensor
    """``[N, 3, S, S]``: one image, or the sampled frames of a video."""
    name: str


@dataclass
class Turn:
    query: str
    answer: str | None = None
    pixels: torch.Tensor | None = None
    """Images/frames attached to this turn, ``[N, 3, S, S]``."""
    media_names: list[str] = field(default_factory=list)
    stopped: bool = False
    """The answer was cut short by the caller's cancel token."""
    media: list[Media] = field(default_factory=list)
    """The attached media, decoded, in order (what a native-resolution VLM engine reads; ``pixels`` is theirs
    joined)."""


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Answer:
    text: str
    finish_reason: FinishReason
    """``stop``: an end token or a stop string; ``length``: the token limit; ``cancelled``: the cancel token."""
    prompt_tokens: int
    """Prompt positions, image slots included."""
    completion_tokens: int
    """Generated tokens up to the end (the end token itself not counted)."""

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "cancelled"


@dataclass
class Request:
    """One conversation to answer, with what may differ between the members of a batch."""

    turns: list[Turn]
    """The last turn's ``answer`` is ignored: it is the one generated."""
    system_prompt: str | None = None
    """Replaces the template's system prompt (None: the run's)."""
    stop_strings: Sequence[str] = ()
    """The answer ends before the first of these (not included)."""
    max_new_tokens: int | None = None
    """None: the settings' ``max_new_tokens``."""
    cancel: threading.Event | None = None
    """Checked after every token; once set, the answer ends there (``finish_reason == "cancelled"``)."""
    on_text: Callable[[str], None] | None = None
    """Receives the answer piece by piece (beam search: once, whole)."""


class ContextError(ValueError):
    """The prompt does not fit the model's context."""


class MediaMarkerError(ValueError):
    """The media markers typed in a query do not match the files attached to it."""


TYPED_MARKER_RE = re.compile(r"<Img>\s*<ImageHere>\s*</Img>|<ImageHere>|<image>|<video>")
"""Media markers a user may type (MiniGPT-4's and MPP-Qwen's ``<Img><ImageHere></Img>`` and ``<ImageHere>``, our
``<image>`` and ``<video>``)."""


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def place_media(query: str, attached: Sequence[Media], sep: str) -> str:
    """The query with the attached media's markers where the user typed markers (in order, as MPP-Qwen places
    them), or, when none is typed, all first, then ``sep`` and the text. Raises :class:`MediaMarkerError` when the
    typed markers and the attached files differ in number."""
    typed = TYPED_MARKER_RE.findall(query)
    if not typed:
        markers = "".join(m.marker for m in attached)
        return markers + (sep if markers else "") + query  # [template media policy]
    if len(typed) != len(attached):
        images = all(m.marker == IMAGE_MARKER for m in attached) and VIDEO_MARKER not in typed
        marker, file = ("image marker", "image") if images else ("media marker", "media file")
        raise MediaMarkerError(
            f"{_count(len(typed), marker)} but {_count(len(attached), file)} attached; type one marker "
            "(<image>, <ImageHere> or <Img><ImageHere></Img>) per attached file where it belongs, or none to put "
            "them all before the question")
    it = iter(attached)
    return TYPED_MARKER_RE.sub(lambda _: next(it).marker, query)


def answer_stop_ids(tpl: ChatTemplate) -> tuple[list[int], int]:
    """(ids that end an answer, pad id): the one place generation's end tokens are chosen.

    The template's end tokens (ChatML: <|im_end|>, <|im_start|>; Vicuna v0: ###, </s>; ...) and the pad token of
    :meth:`ChatTemplate.special_ids` (Qwen: <|endoftext|>; a generated pad ends the text too)."""
    ids = tpl.special_ids()
    stop_ids = list(tpl.stop_token_ids())
    if ids.pad not in stop_ids:
        stop_ids.append(ids.pad)
    return stop_ids, ids.pad


def vision_modules(model: MultimodalLM) -> list[nn.Module]:
    return [m for m in (model.visual_encoder, model.ln_vision, model.qformer, model.llm_proj) if m is not None]


def plan_llm_device_map(
    llm: nn.Module, max_memory: dict[int | str, int], dtype: torch.dtype, reserve_first: int = 0
) -> dict[str, int]:
    """accelerate's device map for the LLM over the GPUs in ``max_memory`` (bytes per GPU index).

    ``reserve_first`` bytes of GPU 0 are kept for the vision side; the token embeddings go on GPU 0 beside it (the
    image embeddings are merged into them there). Raises ``ValueError`` if the LLM does not fit on the GPUs.
    """
    from accelerate import infer_auto_device_map

    budget: dict[int | str, int | str] = {k: v - reserve_first if k == 0 else v for k, v in max_memory.items()}
    if max_memory.get(0, 0) - reserve_first <= 0:
        raise ValueError(f"GPU 0 has no room for the LLM beside the vision side ({reserve_first / 2**30:.1f} GiB)")
    no_split = list(getattr(llm, "_no_split_modules", None) or [])
    dmap = infer_auto_device_map(llm, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    off = sorted({str(d) for d in dmap.values() if not isinstance(d, int)})
    if off:
        total = sum(v for k, v in max_memory.items() if isinstance(k, int)) / 2**30
        raise ValueError(f"the LLM does not fit on {len(max_memory)} GPU(s) ({total:.1f} GiB usable); it would "
                         f"need {', '.join(off)} offload. Use --load-8bit or more GPUs")
    owner = max((k for k in dmap if k == "" or "model.embed_tokens".startswith(k + ".") or k == "model.embed_tokens"),
                key=len)
    if dmap[owner] != 0:
        raise ValueError(f"accelerate put the token embeddings on GPU {dmap[owner]}, not 0 beside the vision side: "
                         f"{dmap}")
    return cast(dict[str, int], dmap)  # every value is a GPU index: offload was refused above


def dispatch_auto(model: MultimodalLM) -> torch.device:
    """Vision side and embeddings on cuda:0, decoder blocks spread by accelerate over every visible GPU."""
    from accelerate import dispatch_model
    from accelerate.utils import get_balanced_memory

    llm = model.llm_model
    dtype = next(llm.parameters()).dtype
    first = torch.device("cuda", 0)
    for m in vision_modules(model):
        m.to(first)
    if model.query_tokens is not None:
        model.query_tokens.data = model.query_tokens.data.to(first)
    vision_bytes = sum(p.numel() * p.element_size() for m in vision_modules(model) for p in m.parameters())
    no_split = list(getattr(llm, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(llm, dtype=dtype, no_split_module_classes=no_split) or {}
    max_memory: dict[int | str, int] = {k: int(v) for k, v in balanced.items() if isinstance(k, int)}  # bytes
    dmap = plan_llm_device_map(llm, max_memory, dtype, reserve_first=vision_bytes + 2**30)
    dispatch_model(llm, device_map=dict(dmap))
    # torch annotates Module.__setattr__ for tensors and modules only; transformers reads this plain attribute.
    llm.hf_device_map = dmap  # pyright: ignore[reportArgumentType]
    used = sorted({d for d in dmap.values()})
    print(f"LLM spread over cuda:{', cuda:'.join(map(str, used))}; vision on cuda:0", file=sys.stderr)
    return first


def quantize_llm_8bit(model: MultimodalLM) -> int:
    """Swap the LLM's decoder ``nn.Linear`` layers for bitsandbytes ``Linear8bitLt`` (weights quantized when moved
    to CUDA). The LM head, embeddings, norms and the vision side stay in 16-bit. Returns the number swapped."""
    from bitsandbytes.nn.modules import Int8Params, Linear8bitLt

    count = 0
    for block in model.llm_model.model.layers:
        for name, lin in list(block.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q = Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                             threshold=6.0)
            # Int8Params takes its options in __new__; torch's Parameter.__init__, also matched, does not name them.
            q.weight = Int8Params(lin.weight.data, requires_grad=False,
                                  has_fp16_weights=False)  # pyright: ignore[reportCallIssue]
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], q)
            count += 1
    return count


def choose_placement(
    device: str, load_8bit: bool, llm_device_map: str | None
) -> tuple[torch.device, torch.dtype, str]:
    """(device to load on, dtype, mode) with mode in {"single", "8bit", "auto"}; clear errors for impossible asks."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if llm_device_map == "cpu":  # MPP-Qwen-Next's spelling for "LLM on the CPU": here the whole model goes there
        print("--llm_device_map cpu: the whole model runs on the CPU (fp32)", file=sys.stderr)
        device, llm_device_map, cuda = "cpu", None, False
    if llm_device_map not in (None, "auto"):
        raise ValueError(f"--llm_device_map {llm_device_map!r}: only 'auto' (or 'cpu') is supported")
    if load_8bit and llm_device_map:
        raise ValueError("--load-8bit and --llm_device_map auto cannot be combined; 8-bit alone fits a 14B LLM "
                         "on one 24 GB GPU")
    if load_8bit:
        if not cuda:
            raise ValueError("--load-8bit needs a CUDA GPU (bitsandbytes int8 kernels); drop it to run in fp32 on "
                             "the CPU" + (" (you passed --cpu-only)" if device == "cpu" else ""))
        try:
            import bitsandbytes  # noqa: F401 - only whether it is installed
        except ImportError as e:
            raise ValueError("--load-8bit needs bitsandbytes: pip install -e '.[quant]'") from e
        return torch.device("cpu"), torch.float16, "8bit"
    if llm_device_map:
        if not cuda:
            raise ValueError("--llm_device_map auto spreads the LLM over several CUDA GPUs, and none is "
                             f"{'used (you passed --cpu-only)' if device == 'cpu' else 'visible'}; drop the flag "
                             "to run on the CPU")
        if torch.cuda.device_count() < 2:
            print("--llm_device_map auto: only one GPU is visible, so everything goes on cuda:0", file=sys.stderr)
        else:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.device("cpu"), dtype, "auto"
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else torch.float32)
    return dev, dtype, "single"


class _Row:
    """One sequence's answer as it is generated: end tokens, stop strings, its own token limit, streamed text."""

    def __init__(self, decode: Callable[[list[int]], str], cut: Callable[[str], str], stop_texts: Sequence[str],
                 stop_sequences: list[list[int]], req: Request, max_new: int, stream: bool) -> None:
        """``decode``: answer ids -> text; ``cut``: the template's answer rule; ``stop_texts``: the template's stop
        texts (held back while streaming)."""
        self.decode, self.cut, self.max_new = decode, cut, max_new
        self.stop_sequences = stop_sequences
        self.stop_strings = StopStrings(list(req.stop_strings))
        self.held = StopStrings([*req.stop_strings, *stop_texts])
        """Text whose beginning is held back while streaming (a stop text such as '###' never shows in part)."""
        self.on_text = req.on_text if stream else None
        self.cancel = req.cancel
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None or (self.cancel is not None and self.cancel.is_set())

    def push(self, token: int) -> None:
        if self.done:
            return
        self.ids.append(token)
        end = next((seq for seq in self.stop_sequences if self.ids[-len(seq):] == seq), None)
        if end is not None:  # the template's stop sequence (not part of the answer)
            del self.ids[-len(end):]
            self.text, self.finish = self.cut(self.decode(self.ids)), "stop"
        else:
            self.text = self.cut(self.decode(self.ids))
            cut = self.stop_strings.first(self.text)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.ids) >= self.max_new:
                self.finish = "length"
        self.flush(final=self.finish is not None)

    def flush(self, final: bool) -> None:
        """Hand on the text not yet sent, holding back an incomplete character, a possible stop string's start and
        whitespace that may turn out to end the answer: the pieces join to exactly the final (stripped) answer."""
        text = self.text.lstrip()
        if not final:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                return
            text = text[:len(text) - self.held.held(text)]
        text = text.rstrip()
        if len(text) > self.sent and self.on_text is not None:
            self.on_text(text[self.sent:])
        self.sent = max(self.sent, len(text))

    def answer(self, prompt_tokens: int) -> Answer:
        self.flush(final=True)
        finish = self.finish or ("cancelled" if self.cancel is not None and self.cancel.is_set() else "length")
        return Answer(self.text.strip(), finish, prompt_tokens, len(self.ids))


class _RowsDone(StoppingCriteria):
    """Feeds each step's new tokens to the rows and tells generate() which rows are finished or cancelled."""

    def __init__(self, rows: list[_Row], num_beams: int) -> None:
        self.rows, self.num_beams, self.seen = rows, num_beams, 0  # seen: tokens already handed to the rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.num_beams > 1:  # one request; its hypotheses are only final at the end (decoded from the output)
            return torch.full((input_ids.shape[0],), self.rows[0].done, dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.seen:].tolist()
        self.seen = input_ids.shape[1]
        for row, tokens in zip(self.rows, new, strict=True):
            for t in tokens:
                row.push(t)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """A model and what is fixed with it; every call brings its own turns, settings and cancel token."""

    def __init__(
        self, model: MultimodalLM, tpl: ChatTemplate, image_size: int, device: torch.device,
        video_fps: float | None = None,
    ) -> None:
        self.model, self.tpl, self.device, self.video_fps = model, tpl, device, video_fps
        self.transform = media.image_transform("eval", image_size, hflip=False)
        self.stop_ids, self.pad_id = answer_stop_ids(tpl)
        # Multi-token stop sequences (Vicuna v0's "###" = [835] or [2277, 29937]) come from the template table; the
        # single end ids are also passed to generate() as eos ids.
        self.stop_sequences = [*tpl.stop_sequences(), *([i] for i in self.stop_ids if [i] not in tpl.stop_sequences())]
        self.context_length = int(getattr(model.llm_model.config, "max_position_embeddings", 0) or 0)
        """Prompt + answer positions the LLM was built for (0: unknown, unchecked)."""

    @classmethod
    def from_files(
        cls, cfg_path: str | Path, checkpoint: str | Path | None, *, device: str = "auto", options: Sequence[str] = (),
        load_8bit: bool = False, llm_device_map: str | None = None,
    ) -> ChatEngine:
        """Load config, tokenizer and model; ``device`` is "auto" (CUDA when present), "cpu" or "cuda[:i]"."""
        load_dev, dtype, mode = choose_placement(device, load_8bit, llm_device_map)
        if device not in ("auto", "cpu") and mode == "single":
            load_dev = torch.device(device)
        cfg = load_config(cfg_path, list(options))
        tok = load_tokenizer(resolve_tokenizer_ref(cfg.model.llm.tokenizer, Path(cfg_path)))
        spec = describe(cfg.model)
        model = load_model(cfg, checkpoint, tok, load_dev, dtype, spec)
        if mode == "8bit":
            n = quantize_llm_8bit(model)
            model = model.to(torch.device("cuda", 0)).eval()
            load_dev = torch.device("cuda", 0)
            print(f"LLM in 8-bit: {n} linear layers quantized by bitsandbytes", file=sys.stderr)
        elif mode == "auto":
            load_dev = dispatch_auto(model)
        tpl = family_named(spec.family).template(tok, cfg)
        return cls(model, tpl, cfg.model.vision.image_size, load_dev, cfg.data.video_fps)

    # --- media and turns -----------------------------------------------------------------------------------------
    def load_media(self, path: str | Path, video: bool | None = None) -> Media:
        """Decode an image or a video (by suffix unless ``video`` says); ``media.MediaError`` names the file."""
        path = Path(path)
        if video is None:
            video = path.suffix.lower() in VIDEO_SUFFIXES
        if video:
            frames = media.load_video_frames(path, self.tpl.num_video_frames, fps=self.video_fps)
            return Media(VIDEO_MARKER, media.video_to_tensor(frames, self.transform), str(path))
        return Media(IMAGE_MARKER, self.transform(media.load_image(path)).unsqueeze(0), str(path))

    def load_image_bytes(self, data: bytes, name: str) -> Media:
        """An image sent inline (e.g. a base64 data URL): the same checks as a file; errors name ``name``."""
        with tempfile.TemporaryDirectory(prefix="lavis-img-") as tmp:
            path = Path(tmp) / "image"
            path.write_bytes(data)
            try:
                m = self.load_media(path, video=False)
            except media.MediaError as e:
                raise media.MediaError(str(e).replace(str(path), name)) from None
        m.name = name
        return m

    def make_turn(self, query: str, attached: Sequence[Media]) -> Turn:
        """The attached media where the query has markers (:func:`place_media`), else first, then the text: joined
        directly for ChatML (MPP-Qwen's cli_demo), with one space for the Vicuna / LLaMA-2 templates (MiniGPT-4's
        demo joins ``<Img><ImageHere></Img>`` and the question with ``' '``)."""
        pixels = torch.cat([m.pixels for m in attached]) if attached else None
        return Turn(place_media(query, attached, self.tpl.spec.media_sep), None, pixels, [m.name for m in attached],
                    media=list(attached))

    @property
    def media_sep(self) -> str:
        """What joins the media placed before a query without markers and its text (:func:`place_media`)."""
        return self.tpl.spec.media_sep

    @property
    def num_video_frames(self) -> int:
        """Frames a video becomes (what a not yet decoded video stands for when a prompt is measured)."""
        return self.tpl.num_video_frames

    def encode(self, turns: Sequence[Turn], system_prompt: str | None = None) -> list[int]:
        """Prompt ids of ``turns`` (the last one's answer to be generated); raises :class:`ContextError` when the
        prompt leaves no room for an answer."""
        tpl = self.tpl if system_prompt is None else replace(self.tpl, system_prompt=system_prompt)
        ids = encode_prompt([(t.query, t.answer) for t in turns[:-1]] + [(turns[-1].query, None)], tpl)
        if self.context_length and len(ids) >= self.context_length:
            images = sum(0 if t.pixels is None else t.pixels.shape[0] for t in turns)
            raise ContextError(f"the prompt is {len(ids)} tokens ({images} image(s)/frame(s) x {self.tpl.num_query} "
                               f"slots each), at or over the model's context of {self.context_length}; send fewer "
                               "images or a shorter conversation")
        return ids

    # --- generation ----------------------------------------------------------------------------------------------
    def generate(
        self, turns: list[Turn], settings: GenerationSettings, stop: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """The answer to the last of ``turns``; ``stop`` (set from any thread) ends it after the current token;
        ``on_text`` receives it piece by piece as it is generated (beam search: once, at the end)."""
        return self.run([Request(turns, cancel=stop, on_text=on_text)], settings)[0]

    def generate_batch(self, conversations: Sequence[list[Turn]], settings: GenerationSettings) -> list[Answer]:
        """Answers to many conversations decoded together (see :meth:`run`); same order as ``conversations``."""
        return self.run([Request(turns) for turns in conversations], settings)

    def answer(self, paths: Sequence[str | Path], query: str, settings: GenerationSettings | None = None) -> str:
        """One question about ``paths`` (images or a video), no history; greedy unless ``settings`` say otherwise."""
        turn = self.make_turn(query, [self.load_media(p) for p in paths])
        return self.generate([turn], settings or GenerationSettings()).text

    @torch.inference_mode()
    def run(self, requests: Sequence[Request], settings: GenerationSettings, seed: int | None = None) -> list[Answer]:
        """Answer ``requests`` in one batched decode: prompts left-padded, each sequence ending on its own (end
        token, stop string, its token limit or its cancel token) while the others go on. Under greedy decoding each
        answer is the one the request gets alone. ``seed`` seeds torch's generator first (sampling)."""
        if not requests:
            return []
        if settings.num_beams > 1 and len(requests) > 1:
            raise ValueError("beam search answers one request at a time")
        prompts = [self.encode(r.turns, r.system_prompt) for r in requests]
        streamed = settings.num_beams == 1
        tpl = self.tpl
        rows = [_Row(tpl.tokenizer.decode, tpl.cut_answer, tpl.spec.stop_texts, self.stop_sequences, r,
                     r.max_new_tokens or settings.max_new_tokens, streamed) for r in requests]
        embed_dev = self.model.llm_model.get_input_embeddings().weight.device
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=embed_dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=embed_dev)
        pix = [t.pixels for r in requests for t in r.turns if t.pixels is not None]
        pixels = torch.cat(pix) if pix else torch.zeros(0, 3, 1, 1)
        vision_dev = self.model.visual_encoder.patch_embed.proj.weight.device
        embeds = self.model.embed(pixels.to(vision_dev), input_ids)
        s = settings
        # MiniGPT-4's context window: prompt + answer within max_length; the oldest prompt embeddings are dropped.
        max_new = max(row.max_new for row in rows)
        begin = context_start(embeds.shape[1], max_new, s.max_length or self.tpl.spec.max_length)
        embeds, mask = embeds[:, begin:], mask[:, begin:]
        gen = GenerationConfig(
            max_new_tokens=max(row.max_new for row in rows), min_new_tokens=s.min_new_tokens or None,
            do_sample=s.do_sample, num_beams=s.num_beams, temperature=s.temperature if s.do_sample else None,
            top_p=s.top_p if s.do_sample else None, top_k=(s.top_k or None) if s.do_sample else None,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
        )
        if seed is not None:
            torch.manual_seed(seed)
        # transformers types generate()'s self with a protocol its own PreTrainedModel does not satisfy (device and
        # dtype are properties there).
        out = self.model.llm_model.generate(  # pyright: ignore[reportAttributeAccessIssue]
            inputs_embeds=embeds, attention_mask=mask, generation_config=gen,
            stopping_criteria=StoppingCriteriaList([_RowsDone(rows, s.num_beams)]),
        )
        if not streamed:
            for t in out[0].tolist():
                rows[0].push(t)
        answers = [row.answer(len(p)) for row, p in zip(rows, prompts, strict=True)]
        if not streamed and requests[0].on_text is not None:
            requests[0].on_text(answers[0].text)
        return answers

def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (sampling); both front ends' ``-s/--seed`` and ``:seed``."""
    random.seed(seed)
    torch.manual_seed(seed)


def device_from_args(args: argparse.Namespace) -> str:
    """``--cpu-only`` / ``--gpu-id N`` / default as the ``device`` of :meth:`ChatEngine.from_files`."""
    if args.cpu_only:
        return "cpu"
    return "auto" if args.gpu_id is None else f"cuda:{args.gpu_id}"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags both front ends share (the predecessors' names kept)."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cfg-path", help="the run's config.yaml (or a model recipe)")
    which.add_argument("--model-type", help=f"a shipped model config (lavis/projects/models): "
                                            f"{', '.join(model_types()) or 'none yet'}")
    which.add_argument("--model-dir", help="a transformers VLM directory (Qwen2.5-VL / Qwen3-VL: a published one, or "
                                           "pipemodel2pth.py --hf-out of a run)")
    p.add_argument("-c", "--checkpoint-path", help=".pth from pipemodel2pth.py / pipe_proj2pth.py; for a model.vlm "
                                                   "run: RUN/global_stepN, or RUN (its latest)")
    p.add_argument("--cpu-only", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--gpu-id", "--gpu_id", dest="gpu_id", type=int, help="run on this CUDA device (default: the first)")
    p.add_argument("--llm_device_map", "--llm-device-map", dest="llm_device_map", choices=["auto", "cpu"],
                   help="'auto': spread the LLM over all visible GPUs (vision side on the first); 'cpu': run on the "
                        "CPU (as --cpu-only)")
    p.add_argument("--load-8bit", action="store_true", help="LLM linear layers in int8 via bitsandbytes (CUDA only)")
