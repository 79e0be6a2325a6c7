"""Tokenizers for the packer: a hub name or folder (``AutoTokenizer``), a ``tokenizer.json``
(``tokenizers``) or a SentencePiece ``.model``, all behind one small interface."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import ConfigError, first_line


class TextTokenizer:
    """``encode(texts) -> ids`` without special tokens, plus the ids the packer needs."""

    def __init__(self, name: str, encode: Callable[[list[str]], list[list[int]]], eos_id: int,
                 unk_id: int, vocab_size: int, hf_tokenizer=None):
        self.name, self.encode, self.eos_id, self.unk_id, self.vocab_size = name, encode, eos_id, unk_id, vocab_size
        self.hf_tokenizer = hf_tokenizer  # the transformers tokenizer, for save_pretrained (None for a .model file)

    def save_pretrained(self, folder) -> None:
        """Write a folder that ``AutoTokenizer.from_pretrained`` loads."""
        tok = self.hf_tokenizer if self.hf_tokenizer is not None else _fast_from_sentencepiece(self.name)
        tok.save_pretrained(str(folder))


def _fast_from_sentencepiece(path: str):
    """A ``PreTrainedTokenizerFast`` with the pieces and scores of a SentencePiece unigram ``.model``."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=max(sp.unk_id(), 0), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = {"eos_token": sp.id_to_piece(sp.eos_id())}
    if sp.unk_id() >= 0:
        specials["unk_token"] = sp.id_to_piece(sp.unk_id())
    if sp.pad_id() >= 0:
        specials["pad_token"] = sp.id_to_piece(sp.pad_id())
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


def _from_hf(name: str, tok) -> TextTokenizer:
    tok.model_max_length = int(1e12)  # documents are packed, never truncated: silence the length warning
    vocab = tok.get_vocab()
    eos = tok.eos_token_id
    if eos is None:
        eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise ConfigError(f"--tokenizer: '{name}' defines no end-of-sequence token (looked for {', '.join(_EOS_CANDIDATES)})")
    if tok.eos_token_id is None:
        tok.eos_token = tok.convert_ids_to_tokens(eos)  # saved with the exported model
    added = set(tok.get_added_vocab())
    base = 1 + max((i for t, i in vocab.items() if t not in added), default=max(vocab.values()))
    unk = tok.unk_token_id if tok.unk_token_id is not None else eos

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    return TextTokenizer(name, encode, eos, unk, base, tok)


def load_tokenizer(spec: str) -> TextTokenizer:
    """A hub name, a folder for ``AutoTokenizer``, a ``tokenizer.json`` or a SentencePiece ``.model``."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".model":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ConfigError(f"--tokenizer: cannot load SentencePiece model '{spec}': {first_line(err)}") from None
        if sp.eos_id() < 0:
            raise ConfigError(f"--tokenizer: SentencePiece model '{spec}' defines no EOS piece")
        unk = sp.unk_id() if sp.unk_id() >= 0 else sp.eos_id()
        return TextTokenizer(spec, lambda texts: sp.encode(texts), sp.eos_id(), unk, sp.get_piece_size())
    if path.is_file():
        if path.suffix != ".json":
            raise ConfigError(f"--tokenizer: '{spec}' is neither a tokenizer.json nor a SentencePiece .model file")
        from transformers import PreTrainedTokenizerFast

        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as err:  # tokenizers raises its own exception types for bad files
            raise ConfigError(f"--tokenizer: cannot load '{spec}': {first_line(err)}") from None
        return _from_hf(spec, tok)
    if path.is_dir() or not _looks_like_path(spec):
        from transformers import AutoTokenizer

        from .hub import hub_reachable

        # offline, a hub name can still come from the local Hugging Face cache
        local_only = not path.is_dir() and not hub_reachable()
        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
        except Exception as err:  # OSError offline, ValueError for folders without a tokenizer
            where = "folder" if path.is_dir() else "from the Hugging Face Hub (needs internet, or a cached copy)"
            reason = "the Hub is not reachable and it is not cached" if local_only else first_line(err)[:200]
            raise ConfigError(
                f"--tokenizer: cannot load '{spec}' {where}: {reason}; "
                "give a local tokenizer folder, tokenizer.json or SentencePiece .model file"
            ) from None
        return _from_hf(spec, tok)
    raise ConfigError(f"--tokenizer: path '{spec}' does not exist; give a hub name, a tokenizer folder, a tokenizer.json or a .model file")


def _looks_like_path(spec: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else is meant as a local path."""
    return spec.startswith((".", "/", "~")) or spec.endswith((".json", ".model")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
