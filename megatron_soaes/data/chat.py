"""Chat formats: how a conversation becomes tokens, in one place for training (`data.sft.Template`),
generation prompts, and the Jinja `chat_template` an export ships -- so an engine renders a prompt
exactly as training did.

A format belongs to the tokenizer, not the model: ChatML for the Qwen vocabularies and the demo BPE,
Llama 3's header format for the Llama 3 vocabulary, and for an HF tokenizer directory that brings a
`chat_template` of its own (a user's Mistral-, Gemma-, SmolLM-style model) that very template
(`JinjaChat`), rendered as transformers renders it. Phases never ask which family they train.

Each format renders a conversation to token ids plus a per-token target mask (`render`): the model
learns the answer of each assistant turn it is asked to (`learn`: message indices) and the token that
closes it, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ChatTemplateError(ValueError):
    """A chat template from which prompts or answer spans cannot be derived."""


@dataclass(frozen=True)
class ChatFormat:
    """A turn is ``turn_start + role + header_end + content + turn_end + after_turn``; `bos` opens the
    conversation once. The model learns ``content + turn_end`` of assistant turns, so `turn_end` is the
    token generation stops at."""

    name: str
    turn_start: str
    header_end: str
    turn_end: str
    after_turn: str = ""
    bos: str | None = None

    def header(self, role: str) -> str:
        return f"{self.turn_start}{role}{self.header_end}"

    def jinja(self, default_system: str | None) -> str:
        """The same rendering as Jinja for HF `tokenizer_config.json`; `default_system` is inserted when
        a conversation has no system turn (as training did)."""
        q = lambda s: "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"  # noqa: E731
        out = "{{ " + q(self.bos) + " }}" if self.bos else ""
        if default_system is not None:
            out += ("{% if messages[0]['role'] != 'system' %}{{ " + q(self.header("system") + default_system
                                                                        + self.turn_end + self.after_turn)
                    + " }}{% endif %}")
        out += ("{% for message in messages %}{{ " + q(self.turn_start) + " + message['role'] + " + q(self.header_end)
                + " + message['content'] + " + q(self.turn_end + self.after_turn) + " }}{% endfor %}")
        return out + "{% if add_generation_prompt %}{{ " + q(self.header("assistant")) + " }}{% endif %}"

    def render(self, messages: list[dict], tok, learn: set[int], for_generation: bool) -> tuple[list[int], list[int]]:
        end, tail = tok.token_id(self.turn_end), tok.encode(self.after_turn)
        ids = [tok.token_id(self.bos)] if self.bos else []
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            head = tok.encode(self.header(m["role"]), allow_special=True)
            body = tok.encode(m["content"]) + [end]
            ids += head + body + tail
            mask += [0] * len(head) + [int(i in learn)] * len(body) + [0] * len(tail)
        if for_generation:
            header = tok.encode(self.header("assistant"), allow_special=True)
            ids += header
            mask += [0] * len(header)
        return ids, mask


CHATML = ChatFormat("chatml", "<|im_start|>", "\n", "<|im_end|>", after_turn="\n")
LLAMA3 = ChatFormat("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", bos="<|begin_of_text|>")


@dataclass(frozen=True)
class JinjaChat:
    """A model's own Jinja `chat_template` (from its HF tokenizer directory), rendered exactly as
    transformers' `apply_chat_template` renders it. Answer spans come from rendering with and without
    each assistant turn: the text an assistant turn adds after the generation prompt, up to and
    including the token that ends the turn (`turn_end`, found by rendering a probe conversation), is
    learned. A template whose renderings are not prefixes of each other (one that rewrites earlier
    turns) cannot be trained this way and is refused before training."""

    template: str
    special: dict = field(default_factory=dict)  # bos_token, eos_token, ...: the template's variables
    turn_end: str = ""
    bos: str | None = None
    turn_start: str | None = None  # (no fixed turn opener; kept for the exporters' special-token checks)
    name: str = "jinja"

    @classmethod
    def from_tokenizer(cls, hf_tok, template: str, where: str) -> "JinjaChat":
        """`template` of a transformers tokenizer, with the turn end its probe rendering shows."""
        special = {k: v for k, v in hf_tok.special_tokens_map.items() if isinstance(v, str)}
        chat = cls(template, special, bos=special.get("bos_token"))
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ANSWER"}]
        text = chat.text(probe)
        after = text[text.rfind("ANSWER") + len("ANSWER"):] if "ANSWER" in text else None
        specials = sorted(set(hf_tok.all_special_tokens) | set(hf_tok.get_added_vocab()), key=len, reverse=True)
        end = next((t for t in specials if after is not None and after.lstrip(" ").startswith(t)), None)
        if end is None:
            raise ChatTemplateError(f"{where}: chat_template: cannot tell where an assistant turn ends (after its "
                                    f"content the template renders {after!r}, not a special token), so generation "
                                    "could not stop where training taught it to")
        return cls(template, special, turn_end=end, bos=special.get("bos_token"))

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2.exceptions import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            (out,), _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                              add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template refuses this conversation: {e}") from None
        return out

    def jinja(self, default_system: str | None) -> str:
        """The same template; with a default system turn inserted as training inserted it."""
        if default_system is None:
            return self.template
        sys_msg = "{'role': 'system', 'content': " + repr(default_system) + "}"
        return ("{% if messages[0]['role'] != 'system' %}{% set messages = [" + sys_msg + "] + messages %}{% endif %}"
                + self.template)

    def render(self, messages: list[dict], tok, learn: set[int], for_generation: bool) -> tuple[list[int], list[int]]:
        full = self.text(messages, add_generation_prompt=for_generation)
        spans = []
        for i in sorted(learn):
            prompt, upto = self.text(messages[:i], add_generation_prompt=True), self.text(messages[:i + 1])
            found = upto.find(messages[i]["content"], len(prompt))
            end = upto.find(self.turn_end, len(prompt) if found < 0 else found + len(messages[i]["content"]))
            if end < 0:
                raise ChatTemplateError(f"chat_template: an assistant turn does not end with {self.turn_end!r}")
            end += len(self.turn_end)
            # (a template may close a whole conversation with more text: only the answer must be a prefix)
            if not (upto.startswith(prompt) and full.startswith(upto[:end])):
                raise ChatTemplateError("chat_template: the rendering of a conversation is not the rendering of its "
                                        "earlier turns followed by the next one (the template rewrites earlier turns), "
                                        "so answer spans cannot be derived")
            spans.append((len(prompt), end))
        ids, offsets = tok.encode_with_offsets(full)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
        return ids, mask
