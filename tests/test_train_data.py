"""Corpora, tokenizers, packing and its resumable position; the schedule; the model presets."""
from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
from train_fixtures import (  # noqa: F401 (autouse fixture)
    SHARED_DATA,
    documents,
    single_thread,
    write_jsonl,
    write_tokenizer,
)

from fullrank.train.corpus import LocalCorpus, make_corpora
from fullrank.train.data import CorpusExhausted, PackedStream, eval_blocks
from fullrank.train.errors import ConfigError
from fullrank.train.tokenizer import load_tokenizer

DOCS = documents(10, sentences=6, seed=3)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", DOCS)))


@pytest.fixture()
def corpus(tmp_path):
    return LocalCorpus(str(write_jsonl(tmp_path / "docs.jsonl", DOCS)), "--data")


def stream_tokens(tok, docs):
    out = []
    for ids in tok.encode(docs):
        out += [*ids, tok.eos_id]
    return out


def test_packing_joins_documents_with_eos(tok, corpus):
    stream = PackedStream(corpus, tok, seq_len=16, vocab_size=1000)
    expected = stream_tokens(tok, DOCS)
    blocks = [stream.next_block().tolist() for _ in range(len(expected) // 16)]
    assert sum(blocks, []) == expected[: 16 * len(blocks)]
    assert tok.eos_id == 1 and sum(b.count(1) for b in blocks) >= len(DOCS) - 1
    with pytest.raises(CorpusExhausted):
        stream.next_block()


@pytest.mark.parametrize("cut", [1, 7, 23, 40])
def test_resume_position_gives_the_same_blocks(tok, corpus, cut):
    """From any state, a new stream continues exactly, also across epochs (allow_repeat)."""
    ref = PackedStream(corpus, tok, seq_len=16, vocab_size=1000, allow_repeat=True, warn=lambda m: None)
    for _ in range(cut):
        ref.next_block()
    state = ref.state_dict()
    json.dumps(state)  # plain types
    resumed = PackedStream(corpus, tok, seq_len=16, vocab_size=1000, allow_repeat=True, state=state, warn=lambda m: None)
    for _ in range(30):
        assert ref.next_block().tolist() == resumed.next_block().tolist()


def test_allow_repeat_warns_and_continues(tok, corpus):
    warnings = []
    stream = PackedStream(corpus, tok, seq_len=16, vocab_size=1000, allow_repeat=True, warn=warnings.append)
    n = len(stream_tokens(tok, DOCS)) // 16 + 5
    for _ in range(n):
        stream.next_block()
    assert stream.state_dict()["epoch"] == 1 and len(warnings) == 1 and "--allow-repeat" in warnings[0]


def test_ids_outside_the_model_vocabulary_become_unk(tok, corpus):
    stream = PackedStream(corpus, tok, seq_len=64, vocab_size=10)
    block = stream.next_block()
    assert block.max() < 10 and (block == tok.unk_id).any()


def test_file_formats_read_the_same_documents(tmp_path):
    docs = ["first document\nwith two lines", "second one", "third"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    write_jsonl(tmp_path / "b.jsonl", docs)
    for name in ("c.json.gz", "d.jsonl.gz"):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "e.parquet")
    for name in ("a.txt", "b.jsonl", "c.json.gz", "d.jsonl.gz", "e.parquet"):
        assert [t for _, t in LocalCorpus(str(tmp_path / name), "--data").docs()] == docs, name
    folder = LocalCorpus(str(tmp_path), "--data")
    assert [p.name for p in folder.files] == ["a.txt", "b.jsonl", "c.json.gz", "d.jsonl.gz", "e.parquet"]
    assert len(list(folder.docs())) == 15
    assert [i for i, _ in folder.docs(start=13)] == [13, 14]


def test_document_level_validation_split_is_deterministic(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", [f"doc {i}" for i in range(25)]))
    train, val = make_corpora(path, None, 0.1)
    train_ids, val_ids = [i for i, _ in train.docs()], [i for i, _ in val.docs()]
    assert val_ids == [0, 10, 20] and sorted(train_ids + val_ids) == list(range(25))
    train2, _ = make_corpora(path, None, 0.1)
    assert [i for i, _ in train2.docs()] == train_ids


def test_eval_blocks_are_fixed_and_capped(tok, corpus):
    messages = []
    blocks = eval_blocks(corpus, tok, 16, 1000, 64, warn=messages.append)
    assert blocks.shape == (4, 16) and torch.equal(blocks, eval_blocks(corpus, tok, 16, 1000, 64))
    everything = eval_blocks(corpus, tok, 16, 1000, 10**6, warn=messages.append)
    assert len(everything) == len(stream_tokens(tok, DOCS)) // 16 and "only" in messages[-1]


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope" / "tok.json"))
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ConfigError, match="neither a tokenizer.json"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


def test_schedule_warmup_cosine_and_relora_rewarmup():
    from fullrank.train.schedule import WarmupCosine

    f = WarmupCosine(max_steps=100, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1) and all(f(t) >= f(t + 1) for t in range(10, 100))
    g = WarmupCosine(max_steps=100, warmup=10, min_ratio=0.1, restart_every=40, restart_warmup=5)
    assert g(39) == pytest.approx(f(39)) and g(40) == pytest.approx(f(40) / 5) and g(44) == pytest.approx(f(44))


def test_model_presets_match_the_paper():
    from transformers import LlamaForCausalLM

    from fullrank.train.models import DEFAULT_RANKS, MODEL_SHAPES, model_config

    expected = {"llama_60m": 58.07, "llama_130m": 134.11, "llama_350m": 367.97, "llama_1b": 1339.08, "llama_7b": 6738.42}
    for name, millions in expected.items():
        config = model_config(name)
        with torch.device("meta"):
            n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        assert n / 1e6 == pytest.approx(millions, abs=0.01), name
        assert config.vocab_size == 32000 and config.max_position_embeddings >= 256
    assert MODEL_SHAPES["llama_1b"] == (2048, 5461, 32, 24)
    assert [DEFAULT_RANKS[k] for k in ("llama_60m", "llama_130m", "llama_350m", "llama_1b")] == [128, 256, 256, 512]
    assert DEFAULT_RANKS["llama_tiny"] == MODEL_SHAPES["llama_tiny"][0] // 4


@pytest.mark.skipif(not (SHARED_DATA / "t5-base").is_dir(), reason="shared data ../shared/data/t5-base is missing")
def test_t5_tokenizer_from_shared_data():
    tok = load_tokenizer(str(SHARED_DATA / "t5-base"))
    assert tok.encode(["Hello world, this is C4."]) == [[8774, 296, 6, 48, 19, 205, 7984]]
    assert tok.eos_id == 1 and tok.vocab_size == 32000


@pytest.mark.skipif(not (SHARED_DATA / "enwiki-2015-train.jsonl.gz").is_file() or not (SHARED_DATA / "t5-base").is_dir(),
                    reason="shared data ../shared/data/enwiki-2015-train.jsonl.gz is missing")
def test_shared_corpus_is_tokenized_lazily():
    tok = load_tokenizer(str(SHARED_DATA / "t5-base"))
    calls = []
    encode = tok.encode
    tok.encode = lambda texts: calls.append(len(texts)) or encode(texts)
    corpus, _ = make_corpora(str(SHARED_DATA / "enwiki-2015-train.jsonl.gz"), str(SHARED_DATA / "enwiki-2015-validation.jsonl.gz"), 0.01)
    stream = PackedStream(corpus, tok, 256, 32000)
    batch = stream.next_batch(8)
    assert batch.shape == (8, 256) and len(calls) == 1 and calls[0] <= 64  # one chunk of the 2,921 articles
    assert stream.state_dict()["doc"] == 0 and stream.state_dict()["offset"] == 8 * 256  # articles are ~4k tokens: packed
