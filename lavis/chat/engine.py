"""One chat engine for the CLI and the web UI: model loading and placement, history, media, generation, streaming.

The prompt is built by ``lavis.data.conversation.encode_prompt`` (the same ChatML rendering as training). Images
attached to a turn are placed as ``<image>`` markers at the start of that turn's query, one per image (then the
text directly for ChatML, as MPP-Qwen-Next's ``cli_demo.py``; after a space for the Vicuna / LLaMA-2 templates, as
MiniGPT-4's demo); a video becomes one ``<video>`` marker, its frames sampled as in training
(``data.num_video_frames``, ``data.video_fps``). Generation stops at the template's end tokens (ChatML:
``<|im_end|>`` / ``<|im_start|>`` / ``<|endoftext|>``; Vicuna v0: ``###`` / ``</s>``); a reply cut by
``max_new_tokens`` keeps its last token (the predecessor drops it).

Placement: one device (bf16 on a GPU that supports it, fp32 on CPU); ``llm_device_map="auto"`` spreads the LLM's
decoder blocks over all visible GPUs with accelerate (vision, Q-Former, projection and token embeddings on the
first); ``load_8bit`` swaps the LLM's linear layers for bitsandbytes int8 ones (CUDA only).

Interruption: :attr:`ChatEngine.stop_event` is checked after every generated token; setting it (Ctrl-C in the CLI,
the stop button in the web UI) ends the answer there, and the partial answer is kept with ``Turn.stopped``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lavis.config.load import load_config
from lavis.config.schema import Config
from lavis.data import media
from lavis.data.conversation import IMAGE_MARKER, VIDEO_MARKER, ChatTemplate, encode_prompt, template_from_config
from lavis.data.tokenizer import ENDOFTEXT, TextTokenizer, load_tokenizer
from lavis.model.mllm import MultimodalLM

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
    """The answer was cut short by :attr:`ChatEngine.stop_event`."""


def resolve_tokenizer_ref(ref: str, cfg_path: Path | None) -> str:
    """A run's config names its saved tokenizer.json relative to the training cwd; also try beside the config."""
    if ref.startswith("builtin:") or Path(ref).exists() or cfg_path is None:
        return ref
    beside = cfg_path.parent / Path(ref).name
    return str(beside) if beside.exists() else ref


def load_model(
    cfg: Config, checkpoint: str | Path | None, tok: TextTokenizer, device: torch.device, dtype: torch.dtype
) -> MultimodalLM:
    """Construct, seed-init, load every file the config names (base weights, then ``checkpoint`` or
    ``model.checkpoint``, ours or a predecessor's) with every key accounted for; raise if any file does not fit."""
    from lavis.model.lora import model_targets
    from lavis.weights.base import stream_into

    placeholder_id = tok.token_id(cfg.model.llm.image_placeholder)
    model = MultimodalLM(cfg.model, placeholder_id)
    model.init_weights(cfg.model.init_seed)
    targets = model_targets(model, cfg.model)  # live parameters and persistent buffers (+ LoRA adapters)
    reports, filled = stream_into(cfg.model, targets, checkpoint=None if checkpoint is None else str(checkpoint))
    for rep in reports:
        print(rep.summary(), file=sys.stderr)
    if reports:
        print(f"{len(filled)} of {len(targets)} tensors loaded from files; the rest keep the seeded init",
              file=sys.stderr)
    return model.to(device=device, dtype=dtype).eval()


def vision_modules(model: MultimodalLM) -> list[nn.Module]:
    return [model.visual_encoder, model.ln_vision, model.qformer, model.llm_proj]


def plan_llm_device_map(
    llm: nn.Module, max_memory: dict[int | str, int], dtype: torch.dtype, reserve_first: int = 0
) -> dict[str, int]:
    """accelerate's device map for the LLM over the GPUs in ``max_memory`` (bytes per GPU index).

    ``reserve_first`` bytes of GPU 0 are kept for the vision side; the token embeddings go on GPU 0 beside it (the
    image embeddings are merged into them there). Raises ``ValueError`` if the LLM does not fit on the GPUs.
    """
    from accelerate import infer_auto_device_map

    budget = {k: v - reserve_first if k == 0 else v for k, v in max_memory.items()}
    if budget.get(0, 0) <= 0:
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
    return dmap


def dispatch_auto(model: MultimodalLM) -> torch.device:
    """Vision side and embeddings on cuda:0, decoder blocks spread by accelerate over every visible GPU."""
    from accelerate import dispatch_model
    from accelerate.utils import get_balanced_memory

    llm = model.llm_model
    dtype = next(llm.parameters()).dtype
    first = torch.device("cuda", 0)
    for m in vision_modules(model):
        m.to(first)
    model.query_tokens.data = model.query_tokens.data.to(first)
    vision_bytes = sum(p.numel() * p.element_size() for m in vision_modules(model) for p in m.parameters())
    no_split = list(getattr(llm, "_no_split_modules", None) or [])
    max_memory = get_balanced_memory(llm, dtype=dtype, no_split_module_classes=no_split)
    max_memory = {k: v for k, v in max_memory.items() if isinstance(k, int)}
    dmap = plan_llm_device_map(llm, max_memory, dtype, reserve_first=vision_bytes + 2**30)
    dispatch_model(llm, device_map=dmap)
    llm.hf_device_map = dmap
    used = sorted({d for d in dmap.values()})
    print(f"LLM spread over cuda:{', cuda:'.join(map(str, used))}; vision on cuda:0", file=sys.stderr)
    return first


def quantize_llm_8bit(model: MultimodalLM) -> int:
    """Swap the LLM's decoder ``nn.Linear`` layers for bitsandbytes ``Linear8bitLt`` (weights quantized when moved
    to CUDA). The LM head, embeddings, norms and the vision side stay in 16-bit. Returns the number swapped."""
    import bitsandbytes as bnb

    count = 0
    for block in model.llm_model.model.layers:
        for name, lin in list(block.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
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
    if llm_device_map not in (None, "auto"):
        raise ValueError(f"--llm_device_map {llm_device_map!r}: only 'auto' is supported")
    if load_8bit and llm_device_map:
        raise ValueError("--load-8bit and --llm_device_map auto cannot be combined; 8-bit alone fits a 14B LLM "
                         "on one 24 GB GPU")
    if load_8bit:
        if not cuda:
            raise ValueError("--load-8bit needs a CUDA GPU (bitsandbytes int8 kernels); drop it to run in fp32 on "
                             "the CPU" + (" (you passed --cpu-only)" if device == "cpu" else ""))
        try:
            import bitsandbytes  # noqa: F401
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
    """A model plus one conversation (``history``, ``pending`` media); :meth:`generate` also serves callers that
    keep their own turns (the web UI keeps one conversation per browser session)."""

    def __init__(
        self, model: MultimodalLM, tpl: ChatTemplate, image_size: int, device: torch.device,
        video_fps: float | None = None,
    ) -> None:
        self.model, self.tpl, self.device, self.video_fps = model, tpl, device, video_fps
        self.transform = media.image_transform("eval", image_size, hflip=False)
        tok = tpl.tokenizer
        # The template's end tokens (ChatML: <|im_end|>, <|im_start|>; Vicuna v0: ###, </s>; ...) and Qwen's
        # <|endoftext|> where the vocabulary has it, which is also the pad id (else the first end token).
        self.stop_ids = list(tpl.stop_token_ids())
        try:
            eot = tok.token_id(ENDOFTEXT)
        except KeyError:
            eot = None
        if eot is not None and eot not in self.stop_ids:
            self.stop_ids.append(eot)
        self.pad_id = eot if eot is not None else self.stop_ids[0]
        self.settings = GenerationSettings()
        self.history: list[Turn] = []
        self.pending: list[Media] = []
        """Media waiting for the next query."""
        self.stop_event = threading.Event()

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
        model = load_model(cfg, checkpoint, tok, load_dev, dtype)
        if mode == "8bit":
            n = quantize_llm_8bit(model)
            model = model.to(torch.device("cuda", 0)).eval()
            load_dev = torch.device("cuda", 0)
            print(f"LLM in 8-bit: {n} linear layers quantized by bitsandbytes", file=sys.stderr)
        elif mode == "auto":
            load_dev = dispatch_auto(model)
        tpl = template_from_config(tok, cfg)
        return cls(model, tpl, cfg.model.vision.image_size, load_dev, cfg.data.video_fps)

    # --- media and history ---------------------------------------------------------------------------------------
    def load_media(self, path: str | Path, video: bool | None = None) -> Media:
        """Decode an image or a video (by suffix unless ``video`` says); ``media.MediaError`` names the file."""
        path = Path(path)
        if video is None:
            video = path.suffix.lower() in VIDEO_SUFFIXES
        if video:
            frames = media.load_video_frames(path, self.tpl.num_video_frames, fps=self.video_fps)
            return Media(VIDEO_MARKER, media.video_to_tensor(frames, self.transform), str(path))
        return Media(IMAGE_MARKER, self.transform(media.load_image(path)).unsqueeze(0), str(path))

    def attach_image(self, path: str | Path) -> None:
        """Decode now (errors surface at once, naming the file); the image joins the next query."""
        self.pending.append(self.load_media(path, video=False))

    def attach_video(self, path: str | Path) -> None:
        self.pending.append(self.load_media(path, video=True))

    def clear_history(self) -> None:
        self.history.clear()

    def clear(self) -> None:
        self.history.clear()
        self.pending.clear()

    # --- generation ----------------------------------------------------------------------------------------------
    def make_turn(self, query: str, attached: Sequence[Media]) -> Turn:
        """Media markers first, then the text: joined directly for ChatML (MPP-Qwen's cli_demo), with one space for
        the Vicuna / LLaMA-2 templates (MiniGPT-4's demo joins ``<Img><ImageHere></Img>`` and the question with
        ``' '``)."""
        markers = "".join(m.marker for m in attached)
        sep = " " if markers and self.tpl.name != "chatml" else ""
        pixels = torch.cat([m.pixels for m in attached]) if attached else None
        return Turn(markers + sep + query, None, pixels, [m.name for m in attached])

    def ask(self, query: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``query`` (with any pending media), append the turn to the history, return the answer."""
        turn = self.make_turn(query, self.pending)
        turn.answer, turn.stopped = self.generate(self.history + [turn], on_text)
        self.history.append(turn)
        self.pending.clear()
        return turn.answer

    def regenerate(self, on_text: Callable[[str], None] | None = None) -> str:
        if not self.history:
            raise ValueError("nothing to regenerate: the history is empty")
        last = self.history[-1]
        last.answer, last.stopped = self.generate(self.history[:-1] + [replace(last, answer=None)], on_text)
        return last.answer

    def answer(self, paths: Sequence[str | Path], query: str) -> str:
        """One stateless question about ``paths`` (images or a video): the conversation is left as it is."""
        return self.generate([self.make_turn(query, [self.load_media(p) for p in paths])], None)[0]

    @torch.inference_mode()
    def generate(self, turns: list[Turn], on_text: Callable[[str], None] | None = None) -> tuple[str, bool]:
        """The answer to the last of ``turns`` (its ``answer`` is ignored) and whether ``stop_event`` cut it short.

        ``on_text`` receives the answer piece by piece as it is generated (greedy or sampling; beam search calls it
        once at the end)."""
        self.stop_event.clear()  # a stop (Ctrl-C) from here on ends this answer
        tok = self.tpl.tokenizer
        ids = encode_prompt([(t.query, t.answer) for t in turns[:-1]] + [(turns[-1].query, None)], self.tpl)
        pix = [t.pixels for t in turns if t.pixels is not None]
        pixels = torch.cat(pix) if pix else torch.zeros(0, 3, 1, 1)
        vision_dev = self.model.visual_encoder.patch_embed.proj.weight.device
        embed_dev = self.model.llm_model.get_input_embeddings().weight.device
        input_ids = torch.tensor([ids], device=embed_dev)
        embeds = self.model.embed(pixels.to(vision_dev), input_ids)
        s = self.settings
        gen = GenerationConfig(
            max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens or None, do_sample=s.do_sample,
            num_beams=s.num_beams, temperature=s.temperature if s.do_sample else None,
            top_p=s.top_p if s.do_sample else None, top_k=None, repetition_penalty=s.repetition_penalty,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
        )
        streamer = _Streamer(tok, on_text, set(self.stop_ids)) if on_text is not None and s.num_beams == 1 else None
        out = self.model.llm_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), generation_config=gen,
            streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopOnEvent(self.stop_event)]),
        )
        stopped = self.stop_event.is_set()
        self.stop_event.clear()
        new = [int(t) for t in out[0]]
        cut = next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))
        text = tok.decode(new[:cut]).strip()
        if on_text is not None and streamer is None:
            on_text(text)
        return text, stopped


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags both front ends share (the predecessors' names kept)."""
    from lavis.config.presets import model_types

    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cfg-path", help="the run's config.yaml (or a model recipe)")
    which.add_argument("--model-type", help=f"a shipped model config (lavis/projects/models): "
                                            f"{', '.join(model_types()) or 'none yet'}")
    p.add_argument("-c", "--checkpoint-path", help=".pth from pipemodel2pth.py / pipe_proj2pth.py")
    p.add_argument("--cpu-only", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--llm_device_map", "--llm-device-map", dest="llm_device_map", choices=["auto"],
                   help="'auto': spread the LLM over all visible GPUs (vision side on the first)")
    p.add_argument("--load-8bit", action="store_true", help="LLM linear layers in int8 via bitsandbytes (CUDA only)")
