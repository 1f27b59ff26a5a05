"""The chat engine of a native-resolution VLM (Qwen2.5-VL, Qwen3-VL): transformers' own model, its own processor.

:class:`VLMChatEngine` offers the interface of :class:`~lavis.chat.engine.ChatEngine` (``load_media``,
``make_turn``, ``encode``, ``generate`` / ``generate_batch`` / ``answer``, ``run`` with ``Request`` / ``Answer`` /
``GenerationSettings``, stop strings, cancel tokens, the context check), so the CLI, the web UI, the API server and
the evaluator answer with it unchanged. What differs is inside:

- the model is transformers' ``...ForConditionalGeneration`` (``AutoModelForImageTextToText``), and answers come
  from its own ``generate``: greedy answers equal ``model.generate`` on the same directory;
- the prompt is the model's chat template (``processor.apply_chat_template(..., add_generation_prompt=True)``) over
  the conversation as transformers' messages (a user turn's ``<image>`` / ``<video>`` markers become its image /
  video parts, in order; without typed markers the media go first, then the text, as in Qwen's examples);
- the media go through the model's processor: images at their own size within the processor's pixel budget (or the
  run's ``data.vlm`` budgets), videos sampled by the video processor's frame rules (``fps``, min / max frames), its
  placeholders expanded to each image's / clip's number of visual tokens;
- an answer ends at the tokenizer's end token (``<|im_end|>``), its pad (``<|endoftext|>``) or the directory's
  ``generation_config.json`` end ids; special tokens are left out of the text. The request's
  :class:`GenerationSettings` replace the directory's sampling defaults (greedy unless they say otherwise).

Two ways in: :meth:`VLMChatEngine.from_model_dir` (a transformers directory: a published one, or ``--hf-out`` of a
run) and :meth:`VLMChatEngine.from_run` (a ``model.vlm`` run's ``config.yaml`` and a checkpoint directory of it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationConfig, PretrainedConfig, StoppingCriteriaList

from lavis.chat.engine import (
    Answer,
    ChatEngine,
    ContextError,
    GenerationSettings,
    Media,
    Request,
    Turn,
    _Row,
    _RowsDone,
    choose_placement,
    place_media,
)
from lavis.config.load import load_config
from lavis.data import media
from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER
from lavis.engine.checkpoint import load_plain_state, resolve_tag_dir
from lavis.engine.vlm_checkpoint import run_vlm_config, trained_model
from lavis.vlm.arch import read_hf_config
from lavis.vlm.config import FAMILIES, VLMConfig
from lavis.vlm.conversation import render, user_content
from lavis.vlm.data import RUN_PROCESSOR_DIR, processor_ref
from lavis.vlm.data_config import VLMDataConfig
from lavis.vlm.processor import Clip, load_clip
from lavis.vlm.processor_files import load_processor
from lavis.vlm.weights import check_directory

__all__ = ["VLMChatEngine", "VLMMedia", "check_model_dir", "is_vlm_config"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".gif")


@dataclass
class VLMMedia(Media):
    """An image or a clip decoded for the processor; ``pixels`` only counts it (``[1 or frames, 0]``)."""

    image: Image.Image | None = None
    clip: Clip | None = None


@dataclass
class _Prompt:
    text: str
    images: list[Image.Image]
    clips: list[Clip]
    decoded: bool
    """False when some media are still stand-ins (the API server measures prompts before decoding)."""


def check_model_dir(path: str | Path) -> Path:
    """``--model-dir``: a transformers directory of a supported VLM family; one-line errors name the file and what
    was expected."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model-dir {path}: not a directory (a transformers VLM directory as save_pretrained "
                                f"writes it: config.json, *.safetensors, the processor's files)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: --model-dir takes a transformers VLM directory (config.json, "
                                "*.safetensors, the processor's files), e.g. a published Qwen2.5-VL / Qwen3-VL one or "
                                "the --hf-out of a run")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg}: not a JSON object ({e})") from None
    if model_type not in FAMILIES:
        raise ValueError(f"{cfg}: model_type {model_type!r} is not a supported VLM (expected one of "
                         f"{', '.join(FAMILIES)}); a BLIP-2-style run is chatted with --cfg-path RUN/config.yaml -c "
                         "M.pth")
    return path


def is_vlm_config(cfg_path: str | Path, options: Sequence[str] = ()) -> bool:
    """Whether a recipe / run config has a ``model.vlm`` section."""
    return load_config(cfg_path, list(options)).model.vlm is not None


def _single_device(device: str, load_8bit: bool, llm_device_map: str | None) -> tuple[torch.device, torch.dtype]:
    if load_8bit or llm_device_map == "auto":
        raise ValueError("--load-8bit and --llm_device_map auto are not supported for a transformers VLM yet; the "
                         "model runs on one device (drop the flag; --cpu-only runs it on the CPU)")
    dev, dtype, _ = choose_placement(device, False, llm_device_map)
    if device not in ("auto", "cpu") and dev.type == "cuda":
        dev = torch.device(device)
    return dev, dtype


def _whole(text: str) -> str:
    return text


class VLMChatEngine(ChatEngine):
    """transformers' VLM and its processor; every call brings its own turns, settings and cancel token."""

    def __init__(self, model: nn.Module, processor: Any, device: torch.device, budget: VLMDataConfig | None = None,
                 where: str = "the model") -> None:
        """``budget``: the pixel / frame budgets over the processor's own (a run's ``data.vlm``; None: the
        processor's); ``where``: the directory or checkpoint, for errors."""
        self.model, self.processor, self.device = model.eval(), processor, device
        self.budget = budget or VLMDataConfig()
        self.tok = processor.tokenizer
        self.tok.padding_side = "left"  # batched prompts end where their answers start
        hf: PretrainedConfig = model.config  # pyright: ignore[reportAssignmentType]
        _check_processor_fits(processor, hf, where)
        self.stop_ids, self.pad_id = _stop_ids(model, self.tok)
        self.stop_sequences = [[i] for i in self.stop_ids]
        self.context_length = int(getattr(hf.get_text_config(), "max_position_embeddings", 0) or 0)
        """Prompt + answer positions the model was built for (0: unknown, unchecked)."""

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, path: str | Path, *, device: str = "auto", load_8bit: bool = False,
                       llm_device_map: str | None = None) -> VLMChatEngine:
        """A transformers VLM directory (``config.json``, safetensors, processor files): every tensor checked
        against its config (none missing, none unexpected), loaded by ``AutoModelForImageTextToText``, with the
        directory's own processor. ``device``: "auto" (CUDA when present, bf16), "cpu" (fp32) or "cuda[:i]"."""
        path = check_model_dir(path)
        dev, dtype = _single_device(device, load_8bit, llm_device_map)
        spec = VLMConfig(path=str(path))
        check_directory(spec, read_hf_config(spec))  # raises naming every missing / unexpected / mis-shaped tensor
        processor = load_processor(str(path))
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype).to(dev)
        return cls(model, processor, dev, where=str(path))

    @classmethod
    def from_run(cls, cfg_path: str | Path, checkpoint: str | Path | None, *, device: str = "auto",
                 options: Sequence[str] = (), load_8bit: bool = False,
                 llm_device_map: str | None = None) -> VLMChatEngine:
        """A ``model.vlm`` run: ``cfg_path`` its ``config.yaml`` (or a recipe), ``checkpoint`` one of its checkpoint
        directories (``RUN/global_stepN``) or the run directory (the checkpoint ``latest`` names); None: the model
        as the config starts it (``model.vlm.path``, or the random init of ``hf_config``). The model is transformers'
        own, filled as ``pipemodel2pth.py --hf-out`` fills it (``lavis.engine.vlm_checkpoint``); the processor is
        the one the run saved (``RUN/processor``), else ``data.vlm.processor`` / ``model.vlm.path``'s; the budgets
        are the run's ``data.vlm``."""
        cfg = load_config(cfg_path, list(options))
        vlm = cfg.model.vlm
        if vlm is None:
            raise ValueError(f"{cfg_path}: no model.vlm section (not a transformers VLM run)")
        dev, dtype = _single_device(device, load_8bit, llm_device_map)
        trained: dict[str, torch.Tensor] = {}
        where = str(cfg_path)
        if checkpoint is not None:
            tag = _checkpoint_dir(Path(checkpoint))
            trained, meta = load_plain_state(tag)
            vlm = run_vlm_config(meta, tag)
            if vlm is None:
                raise ValueError(f"-c {checkpoint}: {tag} is a checkpoint of a BLIP-2-style run (no model.vlm), not of "
                                 f"{cfg_path}'s model")
            where = str(tag)
        model = trained_model(vlm, trained, where).to(device=dev, dtype=dtype)
        saved = Path(cfg_path).parent / RUN_PROCESSOR_DIR
        processor = load_processor(str(saved) if saved.is_dir() else processor_ref(cfg.data.vlm or VLMDataConfig(),
                                                                                   vlm.path))
        return cls(model, processor, dev, cfg.data.vlm, where)

    # --- media and turns -----------------------------------------------------------------------------------------
    @property
    def media_sep(self) -> str:
        return ""  # Qwen's messages: the images / videos, then the text

    @property
    def num_video_frames(self) -> int:
        return 1  # unknown before decoding (the video processor samples by duration); a prompt's lower bound

    def load_media(self, path: str | Path, video: bool | None = None) -> Media:
        """Decode an image, or sample a video's frames with the video processor's rules (by suffix unless ``video``
        says); ``media.MediaError`` names the file."""
        path = Path(path)
        if video is None:
            video = path.suffix.lower() in VIDEO_SUFFIXES
        if video:
            clip = load_clip(path, self.processor, self.budget)
            return VLMMedia(VIDEO_MARKER, torch.empty(len(clip[0]), 0), str(path), clip=clip)
        return VLMMedia(IMAGE_MARKER, torch.empty(1, 0), str(path), image=media.load_image(path))

    def make_turn(self, query: str, attached: Sequence[Media]) -> Turn:
        """The attached media where the query has markers (:func:`place_media`), else first, then the text."""
        pixels = torch.cat([m.pixels for m in attached]) if attached else None
        return Turn(place_media(query, attached, self.media_sep), None, pixels, [m.name for m in attached],
                    media=list(attached))

    def messages(self, turns: Sequence[Turn], system_prompt: str | None = None) -> list[dict[str, Any]]:
        """transformers' chat messages of ``turns`` (the last one's answer to be generated)."""
        out: list[dict[str, Any]] = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        for i, t in enumerate(turns):
            out.append({"role": "user", "content": user_content(t.query)})
            if i < len(turns) - 1:
                out.append({"role": "assistant", "content": t.answer or ""})
        return out

    def _prompt(self, turns: Sequence[Turn], system_prompt: str | None) -> _Prompt:
        text = render(self.processor, self.messages(turns, system_prompt), add_generation_prompt=True)
        attached = [m for t in turns for m in t.media]
        decoded = all(isinstance(m, VLMMedia) for m in attached)
        images = [m.image for m in attached if isinstance(m, VLMMedia) and m.image is not None]
        clips = [m.clip for m in attached if isinstance(m, VLMMedia) and m.clip is not None]
        return _Prompt(text, images, clips, decoded)

    def _process(self, prompts: Sequence[_Prompt]) -> Any:
        """The processor's batch (left-padded ids, mask, patches, grids) of ``prompts``."""
        kwargs: dict[str, Any] = {}
        images = [i for p in prompts for i in p.images]
        clips = [c for p in prompts for c in p.clips]
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = {"size": self.budget.image_size(dict(self.processor.image_processor.size))}
        if clips:
            kwargs["videos"] = [frames for frames, _ in clips]
            kwargs["videos_kwargs"] = {"size": self.budget.video_size(dict(self.processor.video_processor.size)),
                                       "do_sample_frames": False, "video_metadata": [meta for _, meta in clips]}
        return self.processor(text=[p.text for p in prompts], padding=True, return_tensors="pt", **kwargs)

    def inputs(self, turns: Sequence[Turn], system_prompt: str | None = None) -> Any:
        """The processor's batch of one conversation (``input_ids``, ``attention_mask``, patches, grids): what
        ``model(**inputs)`` / ``model.generate(**inputs)`` take."""
        return self._process([self._prompt(turns, system_prompt)])

    def encode(self, turns: Sequence[Turn], system_prompt: str | None = None) -> list[int]:
        """Prompt ids of ``turns`` (each image / clip expanded to its visual tokens); raises :class:`ContextError`
        when the prompt leaves no room for an answer. Media not yet decoded count one token each (a lower bound)."""
        p = self._prompt(turns, system_prompt)
        if p.decoded:
            ids = [int(i) for i in self._process([p])["input_ids"][0]]
        else:
            ids = list(self.tok(p.text)["input_ids"])
        self._check_context(len(ids), len(p.images), len(p.clips))
        return ids

    def _check_context(self, n: int, images: int, clips: int) -> None:
        if self.context_length and n >= self.context_length:
            raise ContextError(f"the prompt is {n} tokens ({images} image(s), {clips} video(s) with their visual "
                               f"tokens), at or over the model's context of {self.context_length}; send fewer or "
                               "smaller images or a shorter conversation")

    # --- generation ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, requests: Sequence[Request], settings: GenerationSettings, seed: int | None = None) -> list[Answer]:
        """Answer ``requests`` in one batched ``model.generate`` (prompts left-padded by the processor, each
        sequence ending on its own: end token, stop string, its token limit or its cancel token)."""
        if not requests:
            return []
        s = settings
        if s.num_beams > 1 and len(requests) > 1:
            raise ValueError("beam search answers one request at a time")
        prompts = [self._prompt(r.turns, r.system_prompt) for r in requests]
        inputs = self._process(prompts).to(self.device)
        lengths = [int(n) for n in inputs["attention_mask"].sum(1)]
        for n, p in zip(lengths, prompts, strict=True):
            self._check_context(n, len(p.images), len(p.clips))
        streamed = s.num_beams == 1
        rows = [_Row(self._decode, _whole, (), self.stop_sequences, r, r.max_new_tokens or s.max_new_tokens, streamed)
                for r in requests]
        gen = GenerationConfig(
            max_new_tokens=max(row.max_new for row in rows), min_new_tokens=s.min_new_tokens or None,
            do_sample=s.do_sample, num_beams=s.num_beams, repetition_penalty=s.repetition_penalty,
            # sampling: every knob explicit (the directory's generation_config.json fills only unset ones)
            **({"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k} if s.do_sample else {}),
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        done = _RowsDone(rows, s.num_beams)
        width = int(inputs["input_ids"].shape[1])
        done.seen = width  # the stopping criterion sees prompt + answer: only the answer goes to the rows
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(  # pyright: ignore[reportCallIssue]  # transformers' GenerationMixin
            **inputs, generation_config=gen, stopping_criteria=StoppingCriteriaList([done]))
        if not streamed:
            for t in out[0, width:].tolist():
                rows[0].push(t)
        answers = [row.answer(n) for row, n in zip(rows, lengths, strict=True)]
        if not streamed and requests[0].on_text is not None:
            requests[0].on_text(answers[0].text)
        return answers

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _checkpoint_dir(checkpoint: Path) -> Path:
    """``-c`` of a ``model.vlm`` run: a ``global_stepN`` directory, or the run directory (its ``latest``)."""
    if checkpoint.is_file():
        raise ValueError(f"-c {checkpoint}: a model.vlm run's checkpoint is a directory, RUN/global_stepN (or RUN "
                         "for its latest); a --hf-out directory is chatted with --model-dir DIR")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"-c {checkpoint}: no such checkpoint directory (RUN/global_stepN, or RUN for its "
                                "latest)")
    return resolve_tag_dir(checkpoint)


def _check_processor_fits(processor: Any, hf: PretrainedConfig, where: str) -> None:
    """The processor's tokenizer, media tokens and patches are the model's (another model's processor gives
    garbage)."""
    rows = hf.get_text_config().vocab_size
    if len(processor.tokenizer) > rows:
        raise ValueError(f"{where}: the processor's tokenizer has {len(processor.tokenizer)} tokens but the model's "
                         f"embedding {rows} rows: the processor belongs to another model")
    ours, theirs = getattr(processor.image_processor, "patch_size", None), hf.vision_config.patch_size
    if ours is not None and ours != theirs:
        raise ValueError(f"{where}: the processor cuts {ours} px patches but the model's vision tower takes "
                         f"{theirs} px ones: the processor belongs to another model")
    for name in ("image_token_id", "video_token_id"):
        ours, theirs = getattr(processor, name, None), getattr(hf, name, None)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(f"{where}: the processor's {name} is {ours} but the model's config.json says {theirs}: "
                             "the processor belongs to another model")


def _stop_ids(model: nn.Module, tok: Any) -> tuple[list[int], int]:
    """(ids that end an answer, pad id): the directory's ``generation_config.json`` end ids, the tokenizer's end
    token and ``<|im_end|>`` / ``<|endoftext|>`` where the vocabulary has them."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    for i in [*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id,
              *(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tok.get_vocab())]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    if not ids:
        raise ValueError("the VLM's tokenizer has no end token (eos_token in tokenizer_config.json)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else getattr(gen, "pad_token_id", None)
    return ids, int(pad) if pad is not None else ids[0]
