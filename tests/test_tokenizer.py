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


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer("llama3")


def test_llama3_published_ids(llama3):
    """Meta's Llama 3 ranks (from the llama-models package) with the 3.1/3.2 specials: the ids the
    released tokenizer gives, plain and chat-rendered (Llama 3's header format, BOS once)."""
    from megatron_soaes.data.sft import Template

    assert llama3.vocab_size == llama3.model_vocab_size == 128256
    named = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
             "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
             "<|python_tag|>": 128010, "<|reserved_special_token_247|>": 128255}
    assert {t: llama3.token_id(t) for t in named} == named
    assert (llama3.bos_id, llama3.eod_id, llama3.stop_id) == (128000, 128001, 128009)
    assert llama3.encode("Hello world") == [9906, 1917]
    assert len(llama3.encode("2024")) == 2  # Llama 3 groups digits in threes, Qwen splits them
    prompt, mask = Template(None).render([{"role": "user", "content": "Hello"}], llama3, for_generation=True)
    assert prompt == [128000, 128006, 882, 128007, 271, 9906, 128009, 128006, 78191, 128007, 271] and not any(mask)
    ids, mask = Template(None).render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], llama3)
    assert [i for i, m in zip(ids, mask) if m] == [9906, 128009]  # the answer and its <|eot_id|> are learned


def test_qwen3_special_tokens():
    q3 = load_tokenizer("qwen3")
    assert q3.vocab_size == 151669 and q3.model_vocab_size == 151936
    published = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_call>": 151657,
                 "</tool_call>": 151658, "<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667,
                 "</think>": 151668}
    assert {t: q3.token_id(t) for t in published} == published
    assert q3.encode("<think>\n\n</think>\n\n", allow_special=True) == [151667, 271, 151668, 271]
    assert q3.encode("Hello world") == [9707, 1879] and q3.stop_id == 151645
