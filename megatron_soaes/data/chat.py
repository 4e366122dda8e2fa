"""Chat formats: how a conversation becomes tokens, in one place for training (`data.sft.Template`),
generation prompts, and the Jinja `chat_template` an export ships -- so an engine renders a prompt
exactly as training did.

A format belongs to the tokenizer, not the model: ChatML for the Qwen vocabularies and the demo BPE,
Llama 3's header format for the Llama 3 vocabulary. Phases never ask which family they train.
"""

from __future__ import annotations

from dataclasses import dataclass


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


CHATML = ChatFormat("chatml", "<|im_start|>", "\n", "<|im_end|>", after_turn="\n")
LLAMA3 = ChatFormat("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", bos="<|begin_of_text|>")
