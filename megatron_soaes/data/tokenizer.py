"""Tokenizers behind one small interface: the real Qwen2/2.5 BPE (``qwen.tiktoken`` ranks + Qwen2's
pre-tokenisation and special tokens), a byte-level BPE in Qwen2's format from a ``tokenizer.json``
(the demo tokenizer, trained by `train_bpe`), a sentencepiece model, or an HF tokenizer directory.

`model_vocab_size` is the embedding size a model for this tokenizer should have: Qwen2.5 pads its
151,665 tokens to 151,936; other tokenizers round up to a multiple of 128.
"""

from __future__ import annotations

import base64
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from megatron_soaes.data.chat import CHATML, LLAMA3, ChatFormat, JinjaChat

# Qwen2's pre-tokenisation pattern (single digits, case-insensitive contractions).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN25_MODEL_VOCAB = 151936
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Common interface. Subclasses set `name`, `vocab_size`, `eod_id` and implement encode/decode."""

    name: str
    vocab_size: int
    eod_id: int
    bos_id: int | None = None  # opens every document and conversation (Llama 3); None for Qwen
    chat: ChatFormat = CHATML

    @property
    def model_vocab_size(self) -> int:
        from megatron_soaes.models.config import pad_vocab

        return pad_vocab(self.vocab_size)

    @property
    def pad_id(self) -> int:
        return self.eod_id

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int:
        raise NotImplementedError

    @property
    def eod_token(self) -> str:
        """The end-of-document token's string (the PAD of exports)."""
        return self.decode([self.eod_id])

    @property
    def stop_id(self) -> int:
        """The token an assistant turn ends with (<|im_end|>, <|eot_id|>): where generation stops."""
        return self.token_id(self.chat.turn_end)

    @property
    def im_start_id(self) -> int:
        return self.token_id("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self.token_id("<|im_end|>")


@dataclass(frozen=True)
class TiktokenVocab:
    """A published tiktoken vocabulary: BPE ranks (an asset), pre-tokenisation, the special tokens
    that follow the ranks (in id order), and the embedding size the released models use."""

    asset: str
    pattern: str
    specials: tuple[str, ...]
    eod: str
    chat: ChatFormat
    model_vocab: int
    nfc: bool = False  # Qwen's tokenizer.json normalises (NFC) first; Llama 3's does not
    tokenizer_class: str = "PreTrainedTokenizerFast"  # what the HF releases' tokenizer_config names


# Llama 3.1/3.2 text models: 256 specials after the 128,000 ranks (names as the HF releases ship them).
_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + tuple(f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - 11))
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
VOCABS = {
    "qwen2": TiktokenVocab("qwen.tiktoken", QWEN2_PATTERN, tuple(QWEN2_SPECIAL_TOKENS), "<|endoftext|>", CHATML,
                           QWEN25_MODEL_VOCAB, nfc=True, tokenizer_class="Qwen2Tokenizer"),
    # Qwen3: the same ranks, four more added tokens (tool responses, thinking), the same embedding size
    "qwen3": TiktokenVocab("qwen.tiktoken", QWEN2_PATTERN, tuple(QWEN2_SPECIAL_TOKENS) + QWEN3_EXTRA_TOKENS,
                           "<|endoftext|>", CHATML, QWEN25_MODEL_VOCAB, nfc=True, tokenizer_class="Qwen2Tokenizer"),
    "llama3": TiktokenVocab("llama3.tiktoken", LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, "<|end_of_text|>", LLAMA3,
                            128256),
}
VOCAB_ALIASES = {"qwen": "qwen2", "qwen2.5": "qwen2", "llama3.1": "llama3", "llama3.2": "llama3"}


class TiktokenTokenizer(Tokenizer):
    """A published vocabulary (Qwen2/2.5, Qwen3, Llama 3.x), offline, from its BPE ranks file."""

    def __init__(self, ranks_path: str | Path, vocab: str | None = None):
        """vocab: a key of VOCABS, or None to tell it by the number of ranks (Qwen 151,643, Llama 3 128,000)."""
        import tiktoken

        path = Path(ranks_path)
        ranks = {}
        try:
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: cannot read BPE ranks ({e})") from None
        n = len(ranks)
        if vocab is None:
            vocab = {151643: "qwen2", 128000: "llama3"}.get(n)
            if vocab is None:
                raise TokenizerError(f"{path}: {n} BPE ranks match no known vocabulary (Qwen 151,643, Llama 3 128,000)")
        self.vocab = VOCABS[vocab]
        self.special = {t: n + i for i, t in enumerate(self.vocab.specials)}
        self.enc = tiktoken.Encoding(name=vocab, pat_str=self.vocab.pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.name = f"{vocab}-tiktoken:{path}"
        self.ranks_path, self.chat = path, self.vocab.chat
        self.vocab_size = n + len(self.special)
        self.eod_id = self.special[self.vocab.eod]
        self.bos_id = self.special[self.chat.bos] if self.chat.bos else None  # documents open as chats do

    @property
    def model_vocab_size(self) -> int:
        return max(self.vocab.model_vocab, super().model_vocab_size if self.vocab_size > self.vocab.model_vocab else 0)

    def encode(self, text, allow_special=False):
        if self.vocab.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if int(i) < self.vocab_size])

    def save_tokenizer_json(self, out_dir: str | Path) -> Path:
        """The same BPE as an HF `tokenizer.json` (what the releases ship), for transformers, vLLM and
        Megatron-LM's HuggingFaceTokenizer. Built from the ranks file directly (no blobfile needed);
        Llama 3's adds <|begin_of_text|> when asked for special tokens, as Meta's does."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter

        out = Path(out_dir) / "tokenizer.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tok = TikTokenConverter(vocab_file=str(self.ranks_path), pattern=self.vocab.pattern,
                                extra_special_tokens=self.special).converted()
        if not self.vocab.nfc:
            tok = Backend.from_str(tok.to_str())
            tok.normalizer = None
        if self.chat.bos:
            b = self.chat.bos
            tok.post_processor = processors.Sequence([
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1",
                                              special_tokens=[(b, self.bos_id)])])
        tmp = out.with_name(out.name + ".tmp")
        tok.save(str(tmp))
        tmp.replace(out)
        return out

    def token_id(self, token):
        if token in self.special:
            return self.special[token]
        ids = self.enc.encode(token, disallowed_special=())
        if len(ids) != 1:
            raise TokenizerError(f"{token!r} is not a single token")
        return ids[0]


QwenTiktokenTokenizer = TiktokenTokenizer  # the name earlier releases exported


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.exists():
            raise TokenizerError(f"{path}: no such sentencepiece model")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.name = f"sentencepiece:{path}"
        self.vocab_size = self.sp.get_piece_size()
        eod = self.sp.piece_to_id("<|endoftext|>")
        self.eod_id = eod if eod != self.sp.unk_id() else self.sp.eos_id()

    def encode(self, text, allow_special=False):
        # Chat specials are sentencepiece user-defined symbols: they always match as one piece.
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    @property
    def eod_token(self) -> str:
        return self.sp.id_to_piece(self.eod_id)  # decode() drops control pieces such as </s>

    def token_id(self, token):
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(self.sp.unk_id()):
            raise TokenizerError(f"{token!r} is not in the sentencepiece vocabulary")
        return i


class BPETokenizer(Tokenizer):
    """A byte-level BPE in Qwen2's format from a ``tokenizer.json``: NFC, Qwen2's pre-tokenisation
    pattern, byte-level BPE, the chat specials. transformers' (and so vLLM's) Qwen2Tokenizer rebuilds
    exactly this pipeline from the file's vocabulary and merges, so an exported model gets the same ids
    in every engine -- which a sentencepiece model cannot (transformers >= 5 loads every qwen2 model's
    tokenizer as Qwen2Tokenizer)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Backend

        self.path = Path(path)
        try:
            self.tok = Backend.from_file(str(self.path))
            self.plain = Backend.from_file(str(self.path))  # special-token strings in text stay text
        except Exception as e:  # noqa: BLE001  (tokenizers raises bare Exceptions)
            raise TokenizerError(f"{self.path}: cannot read tokenizer.json ({e})") from None
        self.plain.encode_special_tokens = True
        self.name = f"bpe:{self.path}"
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = self.token_id("<|endoftext|>")

    def encode(self, text, allow_special=False):
        return (self.tok if allow_special else self.plain).encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token):
        i = self.tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{token!r} is not in the vocabulary of {self.path}")
        return i


class HFTokenizer(Tokenizer):
    """Any HF tokenizer directory (no remote code). Its own `chat_template`, when it has one, is the chat
    format (`JinjaChat`); without one, Llama 3's headers when the vocabulary has them, else ChatML."""

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        self.name = f"hf:{directory}"
        self.vocab_size = len(self.tok)
        vocab = self.tok.get_vocab()
        template = self.tok.chat_template
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        if template:
            if not self.tok.is_fast:
                raise TokenizerError(f"{directory}: a chat template needs a fast tokenizer (tokenizer.json) for "
                                     "its answer spans")
            self.chat = JinjaChat.from_tokenizer(self.tok, template, str(directory))
            self.bos_id = self.tok.bos_token_id if self.chat.bos else None
        elif LLAMA3.turn_end in vocab and LLAMA3.bos in vocab:
            self.chat, self.bos_id = LLAMA3, vocab[LLAMA3.bos]
        eod = self.tok.eos_token_id
        if eod is None:
            eod = self.tok.convert_tokens_to_ids("<|endoftext|>")
        self.eod_id = int(eod)

    def encode(self, text, allow_special=False):
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=not allow_special)

    def encode_with_offsets(self, text) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a rendered chat (special tokens as tokens, as apply_chat_template tokenizes) and each
        token's character span."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])

    def token_id(self, token):
        i = self.tok.convert_tokens_to_ids(token)
        if i is None or i == self.tok.unk_token_id:
            raise TokenizerError(f"{token!r} is not in the tokenizer vocabulary")
        return i


def _vocab_name(spec) -> str | None:
    """The VOCABS key a spec names ('qwen' -> 'qwen2', ...), or None for a path."""
    name = VOCAB_ALIASES.get(str(spec), str(spec))
    return name if name in VOCABS else None


def tokenizer_available(spec: str | Path) -> bool:
    """Whether `load_tokenizer(spec)` works here without a download (a cached published vocabulary,
    or a path that exists)."""
    name = _vocab_name(spec)
    if name:
        from megatron_soaes.data.assets import default_cache_dir

        return (default_cache_dir() / VOCABS[name].asset).exists()
    return Path(spec).exists()


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A published vocabulary by name ('qwen2' (= 'qwen', Qwen2.5), 'qwen3', 'llama3'), a Qwen *.tiktoken
    ranks file, a byte-level BPE *.json (`train_bpe`), a *.model sentencepiece file, or an HF tokenizer
    directory."""
    spec = str(spec)
    name = _vocab_name(spec)
    if name:
        from megatron_soaes.data.assets import fetch

        return TiktokenTokenizer(fetch(VOCABS[name].asset), name)
    path = Path(spec)
    if spec.endswith(".tiktoken"):
        return TiktokenTokenizer(path)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(path)
    if spec.endswith(".json"):
        return BPETokenizer(path)
    if path.is_dir():
        if (path / "tokenizer.model").exists() and not (path / "tokenizer.json").exists():
            return SentencePieceTokenizer(path / "tokenizer.model")
        if (path / "qwen.tiktoken").exists() and not (path / "tokenizer.json").exists():
            return TiktokenTokenizer(path / "qwen.tiktoken")
        return HFTokenizer(path)
    raise TokenizerError(f"{spec}: not a tokenizer (expected {', '.join(VOCABS)}, *.tiktoken, *.json, *.model or an HF directory)")


def train_sentencepiece(texts, model_prefix: str | Path, vocab_size: int = 8000, character_coverage: float = 0.995) -> Path:
    """Train a small BPE sentencepiece model (the demo tokenizer) with Qwen's chat specials as symbols."""
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=character_coverage,  # rare characters fall back to bytes
        user_defined_symbols=list(CHAT_SPECIALS),
        byte_fallback=True,
        normalization_rule_name="identity",  # lossless: keep full-width punctuation and spaces
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        num_threads=2,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=False,  # deterministic: same corpus, same model
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def train_bpe(texts, out_file: str | Path, vocab_size: int = 8000) -> Path:
    """Train the demo tokenizer: a byte-level BPE in Qwen2's format (see `BPETokenizer`) with
    Qwen's chat specials first (ids 0-2), written atomically as a tokenizer.json."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    tok = Backend(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(CHAT_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    return out


def sentencepiece_to_tokenizer_json(model_path: str | Path, out_file: str | Path) -> Path:
    """The same segmentation as a sentencepiece BPE model (identity normalisation, no dummy prefix,
    byte fallback: how `train_sentencepiece` trains) as an HF `tokenizer.json`, for engines that load
    it with `PreTrainedTokenizerFast` (transformers' AutoTokenizer replaces it for qwen2 models)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as Backend

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]  # type 1 normal, 2 unk, 3 control, 4 user, 6 byte
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = []
    for piece, score, kind in pieces:  # every split of a normal piece into two pieces, ranked by its score
        if kind == 1:
            merges += [(-score, vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                       for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    merges.sort()
    tok = Backend(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                             unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in pieces if kind in (2, 3, 4)])
    out = Path(out_file)
    tok.save(str(out))
    return out

