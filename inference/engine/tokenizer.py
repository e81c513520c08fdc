"""Text tokenizer: the release's Qwen2.5 BPE files through ``transformers`` (offline), or the tiny demo vocab.

The reference adds no BOS/EOS in ``encode``; the engine wraps every text block in ``<|im_start|> ... <|im_end|>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
TOKENIZER_FILES = ("vocab.json", "merges.txt")


class TextTokenizer:
    """``encode(text) -> ids`` (no specials added), ``decode(ids) -> text`` (specials kept), ``token_id``."""

    def __init__(self, backend, kind: str) -> None:
        self._tok = backend
        self.kind = kind  # "qwen2" (transformers) or "tiny" (tokenizers)

    def __len__(self) -> int:
        return len(self._tok) if self.kind == "qwen2" else self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if self.kind == "qwen2":
            return list(self._tok.encode(text, add_special_tokens=False))
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        if self.kind == "qwen2":
            i = self._tok.convert_tokens_to_ids(token)
            return None if i is None or i == self._tok.unk_token_id and token != self._tok.unk_token else int(i)
        return self._tok.token_to_id(token)

    @classmethod
    def from_folder(cls, folder: Path) -> TextTokenizer | None:
        """The Qwen2 tokenizer from ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``), or None."""
        if not all((folder / f).is_file() for f in TOKENIZER_FILES):
            missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
            log.info("no tokenizer in %s (missing %s): text APIs are disabled, id-level APIs work", folder, missing)
            return None
        from transformers import Qwen2Tokenizer

        try:
            tok = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise ValueError(f"could not load the Qwen2 tokenizer from {folder}: {e}") from e
        return cls(tok, "qwen2")

    @classmethod
    def tiny(cls) -> TextTokenizer:
        """A byte-level BPE over the 256 byte symbols plus the five special tokens (ids 256..260)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {ch: i for i, ch in enumerate(alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(SPECIAL_TOKENS)
        return cls(tok, "tiny")


class StreamDecoder:
    """Turns a growing id list into text deltas, holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta

    def flush(self) -> str:
        """What is still held back at the end (an incomplete byte sequence decodes to U+FFFD)."""
        text = self.tok.decode(self.ids)
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


# Bagel.chat / InterleaveInferencer.gen_text keep the decoded text after the leading <|im_start|> and
# before the first <|im_end|> or later <|im_start|> (bagel.py:1390, inferencer.py:278): text, not ids,
# so a marker spelt by ordinary tokens cuts too.
ANSWER_STOPS = ("<|im_end|>", "<|im_start|>")


def cut_answer(text: str) -> str:
    """``text`` (the decoded generated tokens, without the leading ``<|im_start|>``) up to the first stop."""
    end = min((i for i in (text.find(s) for s in ANSWER_STOPS) if i >= 0), default=len(text))
    return text[:end]


class AnswerStream:
    """Streams text deltas of :func:`cut_answer`: holds back what could start a stop marker, ends at one."""

    def __init__(self) -> None:
        self.text = ""  # everything received
        self.sent = 0  # characters of it already emitted
        self.done = False

    def push(self, delta: str) -> str:
        if self.done:
            return ""
        self.text += delta
        cut = cut_answer(self.text)
        if len(cut) < len(self.text):
            self.done = True
            return self._emit(len(cut))
        hold = max((k for s in ANSWER_STOPS for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.done else self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out
