"""A user's own model brings its own chat template: an HF tokenizer directory whose `chat_template` is
neither ChatML nor Llama 3 (here Mistral-style ``[INST] ... [/INST]``) is rendered as transformers
renders it, the loss covers exactly the assistant answers and the token that ends them, generation
stops there, an SFT run trains on it, and the export ships the same template."""

import json

import pytest

from megatron_soaes.data.chat import ChatTemplateError, JinjaChat
from megatron_soaes.data.sft import Template

MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

CONVS = [[{"role": "user", "content": "公司法第六条？"}, {"role": "assistant", "content": "公司应当有自己的名称。"},
          {"role": "user", "content": "还有呢？"}, {"role": "assistant", "content": "名称权受法律保护。"}],
         [{"role": "user", "content": "What is a state-owned enterprise?"},
          {"role": "assistant", "content": "An enterprise the state invests in."}]]


def make_tokenizer_dir(path, template: str):
    """A byte-level BPE trained on a few texts, saved by transformers with `template` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [m["content"] for c in CONVS for m in c] * 20 + ["企业国有资产属于国家所有。", "the state council"] * 20
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 chat_template=template)
    hf.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("mistral") / "tok", MISTRAL)


def test_renders_as_transformers_and_learns_exactly_the_answers(tok_dir):
    from transformers import AutoTokenizer

    from megatron_soaes.data.tokenizer import load_tokenizer

    ours, theirs = load_tokenizer(tok_dir), AutoTokenizer.from_pretrained(str(tok_dir))
    assert isinstance(ours.chat, JinjaChat) and ours.chat.turn_end == "</s>" and ours.stop_id == theirs.eos_token_id
    for conv in CONVS:
        ids, mask = Template(None).render(conv, ours)
        assert ids == list(theirs.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
        learned = ours.decode([i for i, m in zip(ids, mask) if m])
        assert learned == "".join(m["content"] + "</s>" for m in conv if m["role"] == "assistant")
        prompt, pm = Template(None).render(conv[:-1], ours, for_generation=True)
        want = theirs.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert prompt == list(want["input_ids"]) and not any(pm) and ids[:len(prompt)] == prompt
    # only the last answer when asked
    ids, mask = Template(None, last_turn_only=True).render(CONVS[0], ours)
    assert ours.decode([i for i, m in zip(ids, mask) if m]) == "名称权受法律保护。</s>"


def test_templates_that_cannot_give_answer_spans_are_refused(tmp_path):
    from megatron_soaes.data.tokenizer import load_tokenizer

    # nothing marks where an answer ends: generation could not stop where training taught it to
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot tell where an assistant turn ends"):
        load_tokenizer(make_tokenizer_dir(tmp_path / "a", no_end))
    # a template that rewrites earlier turns (here: only the last answer is shown) has no prefix structure
    rewrites = ("{% for m in messages %}{% if m['role'] == 'user' or loop.last %}{{ m['role'] + ':' + m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}")
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "b", rewrites))
    with pytest.raises(ChatTemplateError, match="rewrites earlier turns"):
        Template(None).render(CONVS[0], tok)
    # the template's own refusals are one-line errors too (Mistral has no system role)
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "c", MISTRAL))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        Template("You are a helpful assistant.").render(CONVS[1], tok)


def test_sft_on_a_llama_model_with_its_own_template_and_export(tok_dir, tmp_path):
    """A random Llama-architecture model with the Mistral-style tokenizer: SFT trains on the template's
    answer spans, the export carries the same template, and transformers renders training's ids from it."""
    from transformers import AutoTokenizer

    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.config import parse_config
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.training import Trainer
    from megatron_soaes.workflows.export import check_export, export_hf

    tok = load_tokenizer(tok_dir)
    make_random_hf_model(tmp_path / "hf", "test-llama3", seed=3, vocab_size=tok.model_vocab_size)
    base = hf_to_megatron(tmp_path / "hf", tmp_path / "base", progress=False)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in CONVS * 8), encoding="utf-8")
    job = parse_config({
        "kind": "sft", "model": {"preset": "test-llama3", "overrides": {"vocab_size": tok.model_vocab_size},
                                 "init_checkpoint": str(base)},
        "data": {"tokenizer": str(tok_dir), "seq_length": 64},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "dtype": "fp32", "log_interval": 1,
                  "save_interval": 3, "eval_iters": 1, "output_dir": str(tmp_path / "run")},
        "sft": {"train": [{"path": str(data)}], "default_system": None}}, "test")
    trainer = Trainer(job)
    hist = trainer.run()
    assert len(hist) == 3 and all(r.loss > 0 for r in hist)
    # the rows trained on hold exactly the answers' tokens as targets
    assert trainer.task.stats["target_tokens"] == sum(
        len(tok.encode(m["content"])) + 1 for c in CONVS * 8 for m in c if m["role"] == "assistant")
    out = export_hf(tmp_path / "run" / "checkpoints" / "iter_0000003", tmp_path / "export", str(tok_dir), dtype=None)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == MISTRAL
    res = check_export(out, conversations=CONVS)
    assert res["tokenizer_matches"] and res["tokenizer_chat_prompts"] == 2
    exported = AutoTokenizer.from_pretrained(str(out))
    for conv in CONVS:
        assert list(exported.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]) == \
            Template(None).render(conv, tok)[0]


def test_a_template_that_closes_the_conversation_still_gives_answer_spans(tmp_path):
    """Phi-3-style: the whole conversation (not a generation prompt) ends with one more EOS; earlier
    answers are still prefixes of it, and only each answer's own end is learned."""
    from transformers import AutoTokenizer

    from megatron_soaes.data.tokenizer import load_tokenizer

    closing = MISTRAL + "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    d = make_tokenizer_dir(tmp_path / "t", closing)
    ours, theirs = load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    ids, mask = Template(None).render(CONVS[0], ours)
    assert ids == list(theirs.apply_chat_template(CONVS[0], tokenize=True, return_dict=True)["input_ids"])
    assert ours.decode([i for i, m in zip(ids, mask) if m]) == "公司应当有自己的名称。</s>名称权受法律保护。</s>"
    assert ids[-2:] == [ours.stop_id, ours.stop_id] and mask[-1] == 0
