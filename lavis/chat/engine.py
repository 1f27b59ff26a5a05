"""One chat engine for the CLI and the web UI: model loading, history, media, generation and streaming.

The prompt is built by ``lavis.data.conversation.encode_prompt`` (the same ChatML rendering as training). Images
attached to a turn are placed as ``<image>`` markers at the start of that turn's query, one per image with no
separator (MPP-Qwen-Next's ``cli_demo.py`` layout); a video becomes one ``<video>`` marker. Generation stops at
``<|im_end|>`` / ``<|im_start|>`` / ``<|endoftext|>``; a reply cut by ``max_new_tokens`` keeps its last token
(the predecessor drops it).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lavis.config.load import load_config
from lavis.config.schema import Config
from lavis.data import media
from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER, ChatTemplate, encode_prompt
from lavis.data.tokenizer import ENDOFTEXT, IM_END, IM_START, TextTokenizer, load_tokenizer
from lavis.model.mllm import MultimodalLM


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0


@dataclass
class Turn:
    query: str
    answer: str | None = None
    pixels: torch.Tensor | None = None
    """Images/frames attached to this turn, ``[N, 3, S, S]``."""
    media_names: list[str] = field(default_factory=list)


def resolve_tokenizer_ref(ref: str, cfg_path: Path | None) -> str:
    """A run's config names its saved tokenizer.json relative to the training cwd; also try beside the config."""
    if ref.startswith("builtin:") or Path(ref).exists() or cfg_path is None:
        return ref
    beside = cfg_path.parent / Path(ref).name
    return str(beside) if beside.exists() else ref


def load_model(
    cfg: Config, checkpoint: str | Path | None, tok: TextTokenizer, device: torch.device, dtype: torch.dtype
) -> MultimodalLM:
    """Construct, init the base (seeded init; pretrained base weights where the config names them), load the .pth."""
    placeholder_id = tok.token_id(cfg.model.llm.image_placeholder)
    model = MultimodalLM(cfg.model, placeholder_id)
    model.init_weights(cfg.model.init_seed)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # LAVIS / MiniGPT-4 wrapper
            state = state["model"]
        own = model.state_dict()
        unexpected = sorted(set(state) - set(own))
        mismatched = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in state.items() if k in own and v.shape != own[k].shape]
        if unexpected or mismatched:
            raise ValueError(f"{checkpoint} does not fit the model built from the config: unexpected keys "
                             f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; shape mismatches {mismatched[:5]}")
        # Keys the file lacks keep the base weights (a stage-1 model.pth holds only llm_proj.*); unknown keys and
        # shape mismatches were refused above, so nothing in the file is silently dropped.
        model.load_state_dict(state, strict=False)
        print(f"loaded {len(state)} tensors from {checkpoint}; {len(own) - len(state)} come from the base weights",
              file=sys.stderr)
    return model.to(device=device, dtype=dtype).eval()


class _Streamer(BaseStreamer):
    """Decodes the growing answer and hands each new piece of text to ``on_text``."""

    def __init__(self, tok: TextTokenizer, on_text: Callable[[str], None], stop_ids: set[int]) -> None:
        self.tok, self.on_text, self.stop_ids = tok, on_text, stop_ids
        self.ids: list[int] = []
        self.sent = 0
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() first passes the prompt (empty with inputs_embeds)
            self.first = False
            return
        self.ids.extend(int(t) for t in value.flatten() if int(t) not in self.stop_ids)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids)
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    def __init__(self, model: MultimodalLM, tpl: ChatTemplate, image_size: int, device: torch.device) -> None:
        self.model, self.tpl, self.device = model, tpl, device
        self.transform = media.image_transform("eval", image_size, hflip=False)
        tok = tpl.tokenizer
        self.stop_ids = [tok.token_id(IM_END), tok.token_id(IM_START), tok.token_id(ENDOFTEXT)]
        self.settings = GenerationSettings()
        self.history: list[Turn] = []
        self.pending: list[tuple[str, torch.Tensor, str]] = []
        """Media waiting for the next query: (marker, pixels, name)."""
        self.stop_event = threading.Event()

    @classmethod
    def from_files(
        cls, cfg_path: str | Path, checkpoint: str | Path | None, *, device: str = "auto", options: list[str] = ()
    ) -> ChatEngine:
        cfg = load_config(cfg_path, list(options))
        tok = load_tokenizer(resolve_tokenizer_ref(cfg.model.llm.tokenizer, Path(cfg_path)))
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        model = load_model(cfg, checkpoint, tok, dev, dtype)
        tpl = ChatTemplate(tok, cfg.model.llm.system_prompt, cfg.model.llm.image_placeholder,
                           cfg.model.qformer.num_query_tokens, cfg.data.num_video_frames)
        return cls(model, tpl, cfg.model.vision.image_size, dev)

    # --- media and history ---------------------------------------------------------------------------------------
    def attach_image(self, path: str | Path) -> None:
        """Decode now (errors surface at once, naming the file); the image joins the next query."""
        pixels = self.transform(media.load_image(path)).unsqueeze(0)
        self.pending.append((IMAGE_MARKER, pixels, str(path)))

    def attach_video(self, path: str | Path) -> None:
        frames = media.load_video_frames(path, self.tpl.num_video_frames)
        self.pending.append((VIDEO_MARKER, media.video_to_tensor(frames, self.transform), str(path)))

    def clear_history(self) -> None:
        self.history.clear()

    def clear(self) -> None:
        self.history.clear()
        self.pending.clear()

    # --- generation ----------------------------------------------------------------------------------------------
    def ask(self, query: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``query`` (with any pending media), append the turn to the history, return the answer."""
        markers = "".join(m for m, _, _ in self.pending)
        pixels = torch.cat([p for _, p, _ in self.pending]) if self.pending else None
        turn = Turn(markers + query, None, pixels, [n for _, _, n in self.pending])
        answer = self._generate(self.history + [turn], on_text)
        turn.answer = answer
        self.history.append(turn)
        self.pending.clear()
        return answer

    def regenerate(self, on_text: Callable[[str], None] | None = None) -> str:
        if not self.history:
            raise ValueError("nothing to regenerate: the history is empty")
        last = self.history[-1]
        last.answer = self._generate(self.history[:-1] + [replace(last, answer=None)], on_text)
        return last.answer

    @torch.inference_mode()
    def _generate(self, turns: list[Turn], on_text: Callable[[str], None] | None) -> str:
        tok = self.tpl.tokenizer
        ids = encode_prompt([(t.query, t.answer) for t in turns], self.tpl)
        pix = [t.pixels for t in turns if t.pixels is not None]
        pixels = torch.cat(pix) if pix else torch.zeros(0, 3, 1, 1)
        input_ids = torch.tensor([ids], device=self.device)
        embeds = self.model.embed(pixels.to(self.device), input_ids)
        s = self.settings
        gen = GenerationConfig(
            max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, num_beams=s.num_beams,
            temperature=s.temperature if s.do_sample else None, top_p=s.top_p if s.do_sample else None,
            top_k=None, repetition_penalty=s.repetition_penalty,
            eos_token_id=self.stop_ids, pad_token_id=tok.token_id(ENDOFTEXT),
        )
        self.stop_event.clear()
        streamer = _Streamer(tok, on_text, set(self.stop_ids)) if on_text is not None and s.num_beams == 1 else None
        out = self.model.llm_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), generation_config=gen,
            streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopOnEvent(self.stop_event)]),
        )
        new = [int(t) for t in out[0]]
        cut = next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))
        return tok.decode(new[:cut]).strip()
