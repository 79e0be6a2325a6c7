"""Corpora: ``allenai/c4`` streamed through HF ``datasets`` (needs internet), or local files.

A corpus yields ``(document index, text)`` from any start index; local files are read lazily and
documents before the start (or of the other split) are skipped without being parsed.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError, first_line

EXTENSIONS = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
FORMATS = "a .txt, .jsonl, .json.gz, .jsonl.gz or .parquet file or a folder of them"
C4 = ("allenai/c4", "en")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((ext for ext in sorted(EXTENSIONS, key=len, reverse=True) if name.endswith(ext)), "")


def list_files(spec: str, flag: str) -> list[Path]:
    """The corpus files of a file or folder (sorted, recursive), each checked to be readable."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{flag}: path '{spec}' does not exist; give 'c4' or {FORMATS}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
        if not files:
            raise ConfigError(f"{flag}: folder '{spec}' holds no corpus file ({', '.join(EXTENSIONS)})")
    else:
        if not _suffix(path):
            raise ConfigError(f"{flag}: unsupported file '{spec}'; allowed extensions: {', '.join(EXTENSIONS)}")
        files = [path]
    for f in files:
        try:
            with open(f, "rb") as handle:
                handle.read(1)
        except OSError as err:
            raise ConfigError(f"{flag}: cannot read '{f}': {err.strerror or first_line(err)}") from None
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def _file_records(path: Path, flag: str) -> Iterator[Callable[[], str | None]]:
    """One callable per document of ``path``, in order; calling it gives the text. Skipped
    documents (before a resume position, or of the other split) are never parsed."""
    kind = _suffix(path)
    try:
        if kind == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise ConfigError(f"{flag}: parquet file '{path}' has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(columns=["text"], batch_size=256):
                for text in batch.column(0).to_pylist():
                    yield lambda text=text: text
        elif kind == ".txt":  # documents are separated by blank lines
            with _open_text(path) as handle:
                lines: list[str] = []
                for line in handle:
                    if line.strip():
                        lines.append(line)
                    elif lines:
                        text, lines = "".join(lines).strip(), []
                        yield lambda text=text: text
                if lines:
                    text = "".join(lines).strip()
                    yield lambda text=text: text
        else:  # JSON Lines, one object with a "text" field per line (C4's shard format)
            with _open_text(path) as handle:
                for lineno, line in enumerate(handle, 1):
                    if line.strip():
                        yield lambda line=line, lineno=lineno: _json_text(line, path, lineno, flag)
    except (OSError, EOFError, UnicodeError) as err:
        raise ConfigError(f"{flag}: cannot read '{path}': {first_line(err)}") from None


def _json_text(line: str, path: Path, lineno: int, flag: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ConfigError(f"{flag}: '{path}' line {lineno} is not JSON; expected JSON Lines with a 'text' field") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ConfigError(f"{flag}: '{path}' line {lineno} has no string field 'text'")
    return record["text"]


class LocalCorpus:
    """Documents of local files; ``keep(i)`` selects the documents (by global index) of this split."""

    def __init__(self, spec: str, flag: str, keep: Callable[[int], bool] = lambda i: True, label: str = ""):
        self.spec, self.flag, self.keep, self.label = spec, flag, keep, label
        self.files = list_files(spec, flag)

    def docs(self, start: int = 0) -> Iterator[tuple[int, str]]:
        index = 0
        for path in self.files:
            for record in _file_records(path, self.flag):
                if index >= start and self.keep(index):
                    text = record()
                    if text:
                        yield index, text
                index += 1

    def describe(self) -> str:
        n = len(self.files)
        return f"{self.spec}{self.label} ({n} file{'s' if n > 1 else ''})"


class C4Corpus:
    """``allenai/c4`` ``en`` streamed from the Hugging Face Hub (needs internet)."""

    def __init__(self, split: str, flag: str = "--data"):
        self.split, self.flag = split, flag

    def _load(self):
        import datasets

        return datasets.load_dataset(*C4, split=self.split, streaming=True)

    def check(self) -> None:
        from .hub import hub_reachable

        if not hub_reachable():
            raise ConfigError(
                f"{self.flag} c4: cannot stream allenai/c4 '{self.split}': the Hugging Face Hub is not reachable "
                "(it needs internet); give --data PATH with local .json.gz shards instead"
            )
        try:
            next(iter(self._load()))
        except Exception as err:  # ConnectionError, hub errors, offline mode
            raise ConfigError(
                f"{self.flag} c4: cannot stream allenai/c4 '{self.split}' from the Hugging Face Hub (needs internet): "
                f"{first_line(err)[:160]}; give --data PATH with local .json.gz shards instead"
            ) from None

    def docs(self, start: int = 0) -> Iterator[tuple[int, str]]:
        ds = self._load()
        if start:
            ds = ds.skip(start)
        for j, example in enumerate(ds):
            if example["text"]:
                yield start + j, example["text"]

    def describe(self) -> str:
        return f"allenai/c4 en {self.split} (streamed)"


def make_corpora(data: str, val_data: str | None, val_fraction: float):
    """(train corpus, validation corpus) for ``--data`` / ``--val-data``."""
    if data == "c4":
        train = C4Corpus("train")
        val = C4Corpus("validation") if val_data is None else None
        if val is None:
            val = C4Corpus("validation", "--val-data") if val_data == "c4" else LocalCorpus(val_data, "--val-data")
        return train, val
    if val_data is not None:
        val = C4Corpus("validation", "--val-data") if val_data == "c4" else LocalCorpus(val_data, "--val-data")
        return LocalCorpus(data, "--data"), val
    every = max(2, round(1.0 / val_fraction))  # document i is held out when i % every == 0
    train = LocalCorpus(data, "--data", lambda i: i % every != 0, label=f" minus every {every}th document")
    val = LocalCorpus(data, "--data", lambda i: i % every == 0, label=f" every {every}th document")
    return train, val


def check_corpus(corpus, what: str) -> None:
    """Fail early when a corpus is unreachable or holds no text."""
    if isinstance(corpus, C4Corpus):
        corpus.check()
        return
    for _ in corpus.docs():
        return
    hint = " (the rest is the validation split: add documents or give --val-data)" if corpus.label else ""
    raise ConfigError(f"{corpus.flag}: the {what} corpus '{corpus.spec}' holds no non-empty text document{hint}")
