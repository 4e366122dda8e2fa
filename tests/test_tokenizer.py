"""Tokenizers: the real Qwen2.5 vocabulary (offline, from the dashscope package's BPE ranks),
a small sentencepiece model, and an HF tokenizer directory."""

import pytest

from megatron_soaes.data.tokenizer import (
    HFTokenizer,
    QwenTiktokenTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

LAW = "第一条　为了维护国家基本经济制度，巩固和发展国有经济，加强对国有资产的保护，发挥国有经济在国民经济中的主导作用，促进社会主义市场经济发展，制定本法。"


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen")


def test_qwen_vocabulary_and_specials(qwen):
    assert isinstance(qwen, QwenTiktokenTokenizer)
    assert qwen.vocab_size == 151665 and qwen.model_vocab_size == 151936
    assert (qwen.eod_id, qwen.im_start_id, qwen.im_end_id) == (151643, 151644, 151645)


def test_qwen_known_ids(qwen):
    # Reference ids of the Qwen2/2.5 tokenizer.
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("<|im_start|>user\n你好<|im_end|>", allow_special=True) == [151644, 872, 198, 108386, 151645]
    # Qwen2 splits digits one by one.
    assert len(qwen.encode("2024")) == 4


def test_qwen_roundtrip_and_special_text_not_parsed_by_default(qwen):
    assert qwen.decode(qwen.encode(LAW)) == LAW
    plain = qwen.encode("<|im_end|>")
    assert 151645 not in plain and qwen.decode(plain) == "<|im_end|>"


def test_sentencepiece_train_and_load(tmp_path):
    texts = [LAW, "国有资产监督管理机构依照本法履行出资人职责。", "公司是企业法人，有独立的法人财产。"] * 50
    model = train_sentencepiece(texts, tmp_path / "spm", vocab_size=400)
    tok = load_tokenizer(model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 400 and tok.model_vocab_size == 512
    assert tok.decode(tok.encode(LAW)) == LAW
    ids = tok.encode("<|im_start|>assistant\n公司<|im_end|>")
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
    assert tok.eod_id == tok.token_id("<|endoftext|>")


def test_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["hello world the company law"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.eod_id == tok.token_id("<|endoftext|>")
    assert tok.decode(tok.encode("hello world")).replace(" ", "") == "helloworld"


def test_bad_specs(tmp_path):
    with pytest.raises(TokenizerError, match="not a tokenizer"):
        load_tokenizer(tmp_path / "nothing.bin")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not-base64-and-no-rank\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken: cannot read BPE ranks"):
        load_tokenizer(bad)


def test_byte_level_bpe_demo_tokenizer(tmp_path):
    """The demo tokenizer: Qwen2's pre-tokenisation over bytes, chat specials at ids 0-2, lossless."""
    from megatron_soaes.data.tokenizer import load_tokenizer, train_bpe

    texts = ["企业国有资产属于国家所有。", "国务院代表国家行使企业国有资产所有权。", "Hello world, 2024年!"] * 50
    tok = load_tokenizer(str(train_bpe(texts, tmp_path / "t.json", vocab_size=400)))
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    s = "未见过的字：龘 😀 a<|im_end|>b"
    assert tok.decode(tok.encode(s)) == s  # byte-level: nothing is unknown
    assert tok.im_end_id not in tok.encode(s) and tok.im_end_id in tok.encode(s, allow_special=True)
    assert train_bpe(texts, tmp_path / "u.json", vocab_size=400).read_bytes() == (tmp_path / "t.json").read_bytes()
