"""Text tokenizers behind one small interface, and the demo's locally built tokenizer.

Everything downstream (templates, collate, chat) needs only :class:`TextTokenizer`: ``encode`` (special-token
text such as ``<|im_start|>`` becomes its special id, as Qwen's ``allowed_special="all"`` does), ``decode``
(special tokens dropped), ``token_id`` and ``vocab_size``. The demo tokenizer (``builtin:shapes``) is a byte-level
BPE trained with the ``tokenizers`` library on the demo generator's fixed corpus, so it needs no download, covers
any input text (bytes), and is identical on every machine; a trained run stores its ``tokenizer.json`` so chat
never rebuilds it.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lavis.data import shapes

# Qwen's ChatML special tokens; the demo tokenizer has the same names so one template serves both.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEMO_SPECIALS = (ENDOFTEXT, IM_START, IM_END, "<|extra_0|>")
DEMO_VOCAB_SIZE = 512


SPECIAL_TOKENS_FILES = ("special_tokens_map.json", "tokenizer_config.json")
"""Hugging Face's files beside a tokenizer that name its pad token (``pad_token``: text or ``{"content": ...}``)."""


def declared_pad_token(directory: Path) -> str | None:
    """The ``pad_token`` that ``special_tokens_map.json`` or ``tokenizer_config.json`` in ``directory`` names (the
    first file that names one), or None."""
    for name in SPECIAL_TOKENS_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            pad = json.loads(file.read_text()).get("pad_token")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{file}: not a JSON object ({e}); fix or remove it") from None
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and pad:
            return pad
    return None


def _save_pad_token(pad_token: str | None, directory: str | Path) -> None:
    """Keep a declared pad token beside a saved tokenizer (a run directory), so chat pads as training did."""
    if pad_token is not None:
        (Path(directory) / SPECIAL_TOKENS_FILES[0]).write_text(json.dumps({"pad_token": pad_token}))


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the few operations the project needs."""

    def __init__(self, tok: Tokenizer, source: str, pad_token: str | None = None) -> None:
        self._tok = tok
        self.source = source
        self._specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        self.pad_token = pad_token
        """The pad token the tokenizer's files declare (None: none; ``lavis.data.conversation.special_ids``
        then pads with the template's end token)."""

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file {file} not found (model.llm.tokenizer points here)")
        tok = Tokenizer.from_file(str(file))
        padding = tok.padding
        pad = declared_pad_token(file.parent) or (padding or {}).get("pad_token")
        return cls(tok, source=str(file), pad_token=pad)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the tokenizer vocabulary ({self.source})")
        return idx

    def is_special(self, token: str) -> bool:
        return token in self._specials

    file_name = "tokenizer.json"
    """What :meth:`save_to` writes; a run directory keeps its tokenizer under this name."""

    def save_to(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory``; returns the file."""
        path = Path(directory) / self.file_name
        self._tok.save(str(path))
        if self.source != "builtin:shapes":
            _save_pad_token(self.pad_token, directory)
        return path


# Qwen v1 (Qwen-7B/14B-Chat) tokenizer facts (docs/FORMATS.md section 5): byte-level BPE ranks in `qwen.tiktoken`,
# this pre-tokenizer regex, NFC normalisation, and specials defined in code after the 151,643 regular tokens.
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
)
QWEN_NUM_REGULAR = 151643
QWEN_SPECIALS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))


class QwenTokenizer:
    """Qwen v1's tokenizer from its ``qwen.tiktoken`` file, through tiktoken (no remote code).

    Like Qwen's ``tokenization_qwen.py``: input is NFC-normalised, special-token text becomes its special id
    (``allowed_special="all"``), no BOS/EOS is added, ``decode(skip_special_tokens=True)`` drops ids >= 151643.
    """

    def __init__(self, path: str | Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Qwen tokenizer file {self.path} not found (see WEIGHT.md)")
        ranks = load_tiktoken_bpe(str(self.path))
        if len(ranks) != QWEN_NUM_REGULAR:
            raise ValueError(f"{self.path}: {len(ranks)} ranks, expected Qwen v1's {QWEN_NUM_REGULAR}")
        self.specials = {tok: QWEN_NUM_REGULAR + i for i, tok in enumerate(QWEN_SPECIALS)}
        self._enc = tiktoken.Encoding("qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.specials)
        self.source = str(self.path)
        self.pad_token = declared_pad_token(self.path.parent) or ENDOFTEXT
        """Qwen v1 has no pad token of its own; QwenLM's ``finetune.py`` and MPP-Qwen pad with ``<|endoftext|>``."""

    @property
    def vocab_size(self) -> int:
        return QWEN_NUM_REGULAR + len(QWEN_SPECIALS)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) >= QWEN_NUM_REGULAR)]
        return self._enc.decode(ids, errors="replace")

    def token_id(self, token: str) -> int:
        if token in self.specials:
            return self.specials[token]
        ids = self._enc.encode(token, allowed_special=set(), disallowed_special=())
        if len(ids) != 1:
            raise KeyError(f"{token!r} is not a single token of {self.source}")
        return ids[0]

    def is_special(self, token: str) -> bool:
        return token in self.specials

    file_name = "qwen.tiktoken"

    def save_to(self, directory: str | Path) -> Path:
        """Copy ``qwen.tiktoken`` into ``directory``; returns the copy."""
        dest = Path(directory) / self.file_name
        if dest.resolve() != self.path.resolve():
            shutil.copy2(self.path, dest)
        return dest


LLAMA_IMAGE_PLACEHOLDER = "<unk>"
"""Image placeholder for the LLaMA / Vicuna family: ``<unk>`` (id 0). LLaMA's SentencePiece model has byte fallback,
so no text ever encodes to ``<unk>``; the id only appears where the template puts it, and the 32000-row vocabulary
stays as it is (no added token, no resized embedding)."""


LLAMA_PAD_TOKEN = "[PAD]"
"""FastChat's pad token, the extra row (id 32000) of Vicuna v0's delta (``added_tokens.json``)."""


class SentencePieceTokenizer:
    """LLaMA / Vicuna tokenizer from ``tokenizer.model`` (sentencepiece), plus ``added_tokens.json`` if present.

    Like transformers' (legacy) ``LlamaTokenizer`` without BOS/EOS: the text is split at special-token text
    (``<s>``, ``</s>``, ``<unk>`` and added tokens), each special becomes its id, each piece between is encoded by
    sentencepiece (which adds its dummy-prefix space to each piece). ``decode(skip_special_tokens=True)`` drops them.
    """

    file_name = "tokenizer.model"

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model {self.path} not found (see WEIGHT.md)")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.specials: dict[str, int] = {}
        for i in range(self._sp.get_piece_size()):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                self.specials[self._sp.id_to_piece(i)] = i
        added = self.path.parent / "added_tokens.json"
        self.added: dict[str, int] = {}
        if added.is_file():
            self.added = {str(k): int(v) for k, v in json.loads(added.read_text()).items()}
            base = self._sp.get_piece_size()
            for tok, idx in self.added.items():
                if idx < base:
                    raise ValueError(f"{added}: {tok!r} has id {idx}, inside the SentencePiece vocabulary ({base})")
            self.specials.update(self.added)
        sp_pad = self._sp.pad_id()
        self.pad_token: str | None = (declared_pad_token(self.path.parent)
                                      or (self._sp.id_to_piece(sp_pad) if sp_pad >= 0 else None)
                                      or (LLAMA_PAD_TOKEN if LLAMA_PAD_TOKEN in self.added else None))
        """``pad_token`` of the files beside it (a prepared Vicuna v0 directory: ``[PAD]``), the model's own pad
        piece, or an added ``[PAD]``; None for Meta's LLaMA / LLaMA-2 ``tokenizer.model`` alone (no pad)."""
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self.source = str(self.path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() + len(self.added)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self.specials:
                ids.append(self.specials[piece])
            else:
                ids += self._sp.encode(piece)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        inv = {v: k for k, v in self.specials.items()}
        out, run = [], []
        for i in (int(x) for x in ids):
            if i in inv:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(inv[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_id(self, token: str) -> int:
        if token in self.specials:
            return self.specials[token]
        idx = self._sp.piece_to_id(token)
        if self._sp.is_unknown(idx):
            raise KeyError(f"{token!r} is not a piece of {self.source}")
        return idx

    def is_special(self, token: str) -> bool:
        return token in self.specials

    def save_to(self, directory: str | Path) -> Path:
        """Copy ``tokenizer.model`` (and ``added_tokens.json``) into ``directory``; returns the model file."""
        dest = Path(directory) / self.file_name
        if dest.resolve() != self.path.resolve():
            shutil.copy2(self.path, dest)
            if self.added:
                (Path(directory) / "added_tokens.json").write_text(json.dumps(self.added))
            _save_pad_token(self.pad_token, directory)
        return dest


AnyTokenizer = TextTokenizer | QwenTokenizer | SentencePieceTokenizer
"""What :func:`load_tokenizer` returns: each class has the interface of the module docstring."""


def build_demo_tokenizer() -> TextTokenizer:
    """Train the demo's byte-level BPE on the shapes generator's fixed corpus (deterministic, < 1 s)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE,
        special_tokens=list(DEMO_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = shapes.corpus() + ["You are a helpful assistant.", "user", "assistant", "system", "<Img></Img>"]
    tok.train_from_iterator(corpus, trainer)
    return TextTokenizer(tok, source="builtin:shapes", pad_token=ENDOFTEXT)


def resolve_tokenizer_ref(ref: str, cfg_path: str | Path | None) -> str:
    """``model.llm.tokenizer`` as a path that exists from here. A run's saved ``config.yaml`` names the tokenizer
    file it copied into the run directory relative to the directory training ran in; from anywhere else the copy is
    found beside the config. Every tool that reads a config (chat, inspect, the dataset checker) resolves it here."""
    if ref.startswith("builtin:") or Path(ref).exists() or cfg_path is None:
        return ref
    beside = Path(cfg_path).parent / Path(ref).name
    return str(beside) if beside.exists() else ref


def load_tokenizer(ref: str) -> AnyTokenizer:
    """Resolve ``model.llm.tokenizer``: ``builtin:shapes``; a ``qwen.tiktoken`` file or a directory holding one
    (Qwen-7B/14B-Chat); a ``tokenizer.model`` (sentencepiece) file or a directory holding one (LLaMA / Vicuna); a
    ``tokenizer.json`` file or its directory (Qwen2.5 / Qwen3)."""
    if ref == "builtin:shapes":
        return build_demo_tokenizer()
    if ref.startswith("builtin:"):
        raise ValueError(f"unknown builtin tokenizer {ref!r}; the only builtin is 'builtin:shapes'")
    path = Path(ref)
    if path.suffix == ".tiktoken":
        return QwenTokenizer(path)
    if path.is_dir() and (path / "qwen.tiktoken").is_file():
        return QwenTokenizer(path / "qwen.tiktoken")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir() and (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model")
    return TextTokenizer.from_file(ref)
