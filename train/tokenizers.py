"""Tokenizers for text sources: bytes by default, or a SentencePiece model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; id 256 ends a document (EOS)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model; its EOS id ends a document."""

    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError as error:
            raise ImportError('tokenizer: a SentencePiece model needs the sentencepiece package: '
                              'pip install "twomamba_jax[train]"') from error
        try:
            self._model = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as error:  # sentencepiece's own message names neither the key nor the fix
            raise ValueError(f"data.tokenizer: {path!r} is not a SentencePiece model file ({error}); expected "
                             "'byte' or a .model file from SentencePieceTrainer") from error
        self.vocab_size = self._model.get_piece_size()
        self.eos_id = self._model.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer: the SentencePiece model {path!r} has no EOS piece to mark document ends")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._model.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._model.decode([int(i) for i in ids])


def make_tokenizer(name: str):
    """``"byte"`` or the path of a SentencePiece ``.model`` file."""
    if name == "byte":
        return ByteTokenizer()
    if Path(name).is_file():
        return SentencePieceTokenizer(name)
    raise ValueError(f"data.tokenizer: expected 'byte' or the path of a SentencePiece model file; got {name!r} "
                     "(no such file)")
