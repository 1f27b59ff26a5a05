"""Text tokenizers behind one small interface, and the demo's locally built tokenizer.

Everything downstream (templates, collate, chat) needs only :class:`TextTokenizer`: ``encode`` (special-token
text such as ``<|im_start|>`` becomes its special id, as Qwen's ``allowed_special="all"`` does), ``decode``
(special tokens dropped), ``token_id`` and ``vocab_size``. The demo tokenizer (``builtin:shapes``) is a byte-level
BPE trained with the ``tokenizers`` library on the demo generator's fixed corpus, so it needs no download, covers
any input text (bytes), and is identical on every machine; a trained run stores its ``tokenizer.json`` so chat
never rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Qwen's ChatML special tokens; the demo tokenizer has the same names so one template serves both.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEMO_SPECIALS = (ENDOFTEXT, IM_START, IM_END, "<|extra_0|>")
DEMO_VOCAB_SIZE = 512


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the few operations the project needs."""

    def __init__(self, tok: Tokenizer, source: str) -> None:
        self._tok = tok
        self.source = source
        self._specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file {file} not found (model.llm.tokenizer points here)")
        return cls(Tokenizer.from_file(str(file)), source=str(file))

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

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self._tok.save(str(path))
        return path


def build_demo_tokenizer() -> TextTokenizer:
    """Train the demo's byte-level BPE on the shapes generator's fixed corpus (deterministic, < 1 s)."""
    from lavis.data import shapes

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
    return TextTokenizer(tok, source="builtin:shapes")


def load_tokenizer(ref: str) -> TextTokenizer:
    """Resolve ``model.llm.tokenizer``: ``builtin:shapes`` or a path to ``tokenizer.json`` / its directory."""
    if ref == "builtin:shapes":
        return build_demo_tokenizer()
    if ref.startswith("builtin:"):
        raise ValueError(f"unknown builtin tokenizer {ref!r}; the only builtin is 'builtin:shapes'")
    return TextTokenizer.from_file(ref)
