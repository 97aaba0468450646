"""A model's chat format as two functions: whole conversations with a learn mask (training) and
prompts that end where the reply starts (generation).

Models trained here use our own format (tokenizer/chat.py). Models from elsewhere bring a Jinja
template; their learn mask comes from rendering the conversation's prefixes: an assistant turn's
text is what the conversation up to and including it adds to the conversation before it plus the
generation prompt, so whatever the template writes around a reply (its end-of-turn token too)
is learned exactly when the template itself puts it after the reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from tokenizers import Tokenizer

from llmforge.tokenizer.chat import render_chat, render_prompt
from llmforge.tokenizer.templates import render_chat_template


@dataclass(frozen=True)
class ChatFormat:
    # messages -> (ids, mask): mask[i] is True where ids[i] is an assistant token to learn
    conversation: Callable[[list[dict]], tuple[list[int], list[bool]]]
    # messages -> ids ending in the assistant turn's opening, ready for generation
    prompt: Callable[[list[dict]], list[int]]
    template: str | None = None  # the Jinja source of a model's own format; None for ours
    special_tokens: dict[str, str] = field(default_factory=dict)  # its bos/eos texts


def native_format(tok: Tokenizer) -> ChatFormat:
    return ChatFormat(partial(render_chat, tok), partial(render_prompt, tok))


def template_format(tok: Tokenizer, template: str, specials: dict[str, str | None]) -> ChatFormat:
    """The format of a model with its own Jinja chat template; `specials` are its bos/eos texts."""
    variables = {k: v for k, v in specials.items() if v is not None}

    def render(messages: list[dict], generation: bool) -> str:
        return render_chat_template(template, messages, add_generation_prompt=generation,
                                    **variables)

    def prompt(messages: list[dict]) -> list[int]:
        return tok.encode(render(messages, True), add_special_tokens=False).ids

    def conversation(messages: list[dict]) -> tuple[list[int], list[bool]]:
        text = render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") != "assistant" or i == 0:
                continue
            start = render(messages[:i], True)
            through = render(messages[: i + 1], False)
            if not (text.startswith(start) and text.startswith(through)):
                raise ValueError("the chat template does not render a conversation as its turns "
                                 "one after another, so assistant tokens cannot be located")
            spans.append((len(start), len(through)))
        encoding = tok.encode(text, add_special_tokens=False)
        mask = [any(a <= begin < b for a, b in spans) for begin, _ in encoding.offsets]
        return encoding.ids, mask

    return ChatFormat(conversation, prompt, template, variables)
