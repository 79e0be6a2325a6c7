"""Packed sequences with a resumable position.

Documents are tokenized a few dozen at a time, joined with an EOS token after each one and cut
into ``seq_len``-token blocks. The position in the stream, ``{"epoch", "doc", "offset"}`` (the
document and the token inside it where the next block starts), is all a checkpoint needs.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Callable

import numpy as np
import torch

from .errors import ConfigError
from .tokenizer import TextTokenizer

CHUNK_CHARS = 200_000  # characters tokenized per call
CHUNK_DOCS = 64


class CorpusExhausted(Exception):
    """The training corpus ran out (and repeating it was not allowed)."""


class PackedStream:
    """``seq_len``-token blocks cut from the documents joined with EOS; resumable by ``state_dict``."""

    def __init__(self, corpus, tokenizer: TextTokenizer, seq_len: int, vocab_size: int, *,
                 allow_repeat: bool = False, state: dict | None = None, warn: Callable[[str], None] = print):
        self.corpus, self.tok, self.seq_len, self.vocab_size = corpus, tokenizer, seq_len, vocab_size
        self.allow_repeat, self.warn = allow_repeat, warn
        state = state or {"epoch": 0, "doc": 0, "offset": 0}
        self.epoch, self._start, self._offset = int(state["epoch"]), int(state["doc"]), int(state["offset"])
        self._next_doc = self._pass_start = self._start  # first document index not yet read
        self._pass_docs = 0  # documents read in this pass over the corpus
        self._docs = corpus.docs(self._start)
        self._pending: deque[list] = deque()  # [epoch, doc index, ids, position]
        self._available = 0

    def state_dict(self) -> dict:
        if self._pending:
            epoch, doc, _, pos = self._pending[0]
            return {"epoch": epoch, "doc": doc, "offset": pos}
        return {"epoch": self.epoch, "doc": self._next_doc, "offset": 0}

    def _read_chunk(self) -> list[tuple[int, str]]:
        chunk, chars = [], 0
        for index, text in self._docs:
            chunk.append((index, text))
            chars += len(text)
            if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
                break
        return chunk

    def _fill(self, need: int) -> None:
        while self._available < need:
            chunk = self._read_chunk()
            if not chunk:
                if not self.allow_repeat:
                    raise CorpusExhausted(f"the corpus {self.corpus.describe()} ran out in epoch {self.epoch}")
                if self._pass_start == 0 and not self._pass_docs:
                    raise ConfigError(f"{self.corpus.flag}: the corpus {self.corpus.describe()} holds no text")
                self.warn(f"warning: the training corpus ran out in epoch {self.epoch}; repeating it (--allow-repeat)")
                self.epoch += 1
                self._next_doc = self._pass_start = self._pass_docs = 0
                self._docs = self.corpus.docs(0)
                continue
            self._pass_docs += len(chunk)
            ids_list = self.tok.encode([text for _, text in chunk])
            for (index, _), ids in zip(chunk, ids_list):
                arr = np.fromiter((*ids, self.tok.eos_id), dtype=np.int64, count=len(ids) + 1)
                arr[arr >= self.vocab_size] = self.tok.unk_id  # added tokens outside the model's vocabulary
                pos = 0
                if self._offset and index == self._start:  # resuming inside this document
                    pos, self._offset = self._offset, 0
                self._pending.append([self.epoch, index, arr, pos])
                self._available += len(arr) - pos
            self._next_doc = chunk[-1][0] + 1

    def next_block(self) -> np.ndarray:
        self._fill(self.seq_len)
        out, filled = np.empty(self.seq_len, dtype=np.int64), 0
        while filled < self.seq_len:
            item = self._pending[0]
            _, _, arr, pos = item
            take = min(self.seq_len - filled, len(arr) - pos)
            out[filled:filled + take] = arr[pos:pos + take]
            filled += take
            item[3] = pos + take
            if item[3] == len(arr):
                self._pending.popleft()
        self._available -= self.seq_len
        return out

    def next_batch(self, rows: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.next_block() for _ in range(rows)]))


class Prefetcher:
    """Builds the next batches of a ``PackedStream`` in a background thread (tokenization overlaps
    the training step). ``get()`` returns ``(batch, stream state after it)``, in order."""

    def __init__(self, stream: PackedStream, rows: int, depth: int = 2):
        self.stream, self.rows = stream, rows
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fullrank-data", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self.stream.next_batch(self.rows), self.stream.state_dict())
            except BaseException as err:  # handed to the consumer, raised there
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self) -> tuple[torch.Tensor, dict]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def eval_blocks(corpus, tokenizer: TextTokenizer, seq_len: int, vocab_size: int, n_tokens: int,
                warn: Callable[[str], None] = print) -> torch.Tensor:
    """The first ``ceil(n_tokens / seq_len)`` blocks of the validation corpus (fixed for the run)."""
    stream = PackedStream(corpus, tokenizer, seq_len, vocab_size)
    wanted = -(-n_tokens // seq_len)
    blocks = []
    try:
        for _ in range(wanted):
            blocks.append(stream.next_block())
    except CorpusExhausted:
        if not blocks:
            raise ConfigError(f"{corpus.flag}: the validation corpus {corpus.describe()} holds fewer than {seq_len} tokens") from None
        warn(f"warning: the validation corpus holds only {len(blocks) * seq_len} of the {n_tokens} --eval-tokens; evaluating on all of it")
    return torch.from_numpy(np.stack(blocks))
