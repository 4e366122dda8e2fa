"""Corpus preprocessing into megatron-core indexed datasets."""

import json

import numpy as np
import pytest

from megatron_soaes.data.preprocess import CleanConfig, PreprocessError, preprocess
from megatron_soaes.data.tokenizer import load_tokenizer, train_sentencepiece

TEXTS = ["国有资产属于国家所有即全民所有。", "公司是企业法人，有独立的法人财产，享有法人财产权。",
         "国务院代表国家行使国有资产所有权。", "1998年新年讲话"] * 30


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return train_sentencepiece(TEXTS, tmp_path_factory.mktemp("spm") / "spm", vocab_size=400)


def write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line, ensure_ascii=False) + "\n").encode())
    return path


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds


def test_tokens_and_eod_match_tokenizer(spm, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:4]])
    stats = preprocess(src, tmp_path / "out", str(spm), progress=False)
    tok = load_tokenizer(spm)
    docs, ds = read_docs(tmp_path / "out")
    assert docs == [tok.encode(t) + [tok.eod_id] for t in TEXTS[:4]]
    assert ds.index.dtype == np.uint16
    assert stats.documents == 4 and stats.tokens == sum(map(len, docs))
    rec = json.loads((tmp_path / "out.stats.json").read_text())
    assert rec["documents"] == 4 and rec["tokens_per_second"] > 0


BAD = [b'{"text": "ok one"}\n', b'{"text": broken\n', b'{"body": "no text"}\n', b'{"text": "\xff\xfe bad"}\n',
       b'{"text": 5}\n', b'{"text": ""}\n', b'{"text": "ok two"}\n']


def test_bad_records_are_skipped_and_reported_with_file_and_line(spm, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    stats = preprocess(src, tmp_path / "out", str(spm), progress=False)
    assert stats.documents == 2 and stats.records_read == 7
    ex = "\n".join(stats.examples)
    assert f"{src}:2: malformed JSON" in ex
    assert f"{src}:3: missing field 'text'" in ex
    assert f"{src}:4: invalid UTF-8" in ex
    assert f"{src}:5: field 'text' is not a string" in ex
    assert stats.empty_documents == 1  # an empty text stays an empty document, as in Megatron-LM
    docs, ds = read_docs(tmp_path / "out")
    tok = load_tokenizer(spm)  # the two good records, in order, each closed by EOD
    assert docs == [tok.encode("ok one") + [tok.eod_id], tok.encode("ok two") + [tok.eod_id]]
    assert np.diff(ds.document_indices).tolist() == [1, 0, 1]


def test_special_token_strings_parse_like_megatron_or_stay_text(tmp_path):
    """Default: a literal special token in the text is the special token (Megatron-LM / HF default)."""
    tok = load_tokenizer("qwen")
    src = write_jsonl(tmp_path / "s.jsonl", [{"text": "甲<|endoftext|>乙"}])
    preprocess(src, tmp_path / "parse", "qwen", progress=False)
    preprocess(src, tmp_path / "text", "qwen", progress=False, special_tokens=False)
    (parsed,), _ = read_docs(tmp_path / "parse")
    (as_text,), _ = read_docs(tmp_path / "text")
    assert parsed.count(tok.eod_id) == 2 and as_text.count(tok.eod_id) == 1
    assert parsed == tok.encode("甲<|endoftext|>乙", allow_special=True) + [tok.eod_id]


def test_strict_mode_fails_on_first_bad_record_and_writes_nothing(spm, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(PreprocessError, match=r"bad.jsonl:2: malformed JSON"):
        preprocess(src, tmp_path / "out", str(spm), strict=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cleaning_filters(spm, tmp_path):
    rows = [{"text": "国有资产属于国家所有。"}, {"text": "国有资产属于国家所有。"}, {"text": "短"},
            {"text": "长" * 500}, {"text": "ok\x00\x01\x02\x03\x04\x05"}, {"text": "★☆♠♣♥♦◆◇○●" * 3 + "文"}]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    clean = CleanConfig(dedup=True, min_chars=3, max_chars=100, max_control_ratio=0.1, max_garbage_ratio=0.5)
    stats = preprocess(src, tmp_path / "out", str(spm), clean=clean, progress=False)
    assert stats.documents == 1
    assert stats.dropped == {"duplicate": 1, "too short": 1, "too long": 1, "control characters": 1, "garbage ratio": 1}


def test_multiprocess_output_is_byte_identical(spm, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t + str(i)} for i, t in enumerate(TEXTS)])
    preprocess(src, tmp_path / "one", str(spm), workers=1, progress=False)
    preprocess(src, tmp_path / "two", str(spm), workers=2, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("one" + ext)).read_bytes() == (tmp_path / ("two" + ext)).read_bytes()


def test_parquet_and_datasets_inputs(spm, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": TEXTS[:5]})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "hfds"))
    preprocess(tmp_path / "p.parquet", tmp_path / "pq", str(spm), text_key="content", progress=False)
    preprocess(tmp_path / "hfds", tmp_path / "hf", str(spm), text_key="content", progress=False)
    assert read_docs(tmp_path / "pq")[0] == read_docs(tmp_path / "hf")[0]
    with pytest.raises(PreprocessError, match="no column 'text'"):
        preprocess(tmp_path / "p.parquet", tmp_path / "x", str(spm), progress=False)


def test_qwen_vocabulary_uses_int32(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:3]])
    preprocess(src, tmp_path / "q", "qwen", progress=False)
    docs, ds = read_docs(tmp_path / "q")
    assert ds.index.dtype == np.int32 and all(d[-1] == 151643 for d in docs)


def test_retokenizing_in_place_drops_megatrons_stale_index_cache(spm, tmp_path):
    """megatron-core caches a dataset's sample indexes under <prefix>/cache keyed by its settings, not by the
    data: a prefix tokenized again (new curation, another tokenizer) must not be read through the old ones."""
    from megatron_soaes.data.gpt_data import build_gpt_dataset

    tok = load_tokenizer(spm)
    preprocess(write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS]), tmp_path / "p", str(spm), progress=False)
    first = build_gpt_dataset([(str(tmp_path / "p"), 1.0)], 8, 16, tok, 0)
    assert (tmp_path / "p" / "cache").is_dir()  # megatron wrote its index cache there
    assert len(first[0]["tokens"]) == 16
    preprocess(write_jsonl(tmp_path / "b.jsonl", [{"text": t * 5} for t in TEXTS[:8]]), tmp_path / "p", str(spm),
               progress=False)
    again = build_gpt_dataset([(str(tmp_path / "p"), 1.0)], 8, 16, tok, 0)
    fresh = build_gpt_dataset([(str(tmp_path / "p"), 1.0)], 8, 16, tok, 0, cache_dir=tmp_path / "fresh")
    assert [again[k]["tokens"].tolist() for k in range(8)] == [fresh[k]["tokens"].tolist() for k in range(8)]
