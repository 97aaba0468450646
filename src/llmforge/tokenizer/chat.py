"""The chat format: one definition used for training masks, generation and the HF export."""

from __future__ import annotations

from tokenizers import Tokenizer

from llmforge.tokenizer.bpe import ASSISTANT, BOS, END, EOS

ROLES = ("system", "user", "assistant")

# HF chat_template equivalent of render_chat/render_prompt, so an exported tokenizer's
# apply_chat_template yields the very ids the model was trained on.
CHAT_TEMPLATE = (
    "{{ '" + BOS + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


def _special_id(tok: Tokenizer, token: str) -> int:
    """Look up a control token, failing loudly if the tokenizer was not trained by llmforge."""
    idx = tok.token_to_id(token)
    if idx is None:
        raise ValueError(f"tokenizer has no {token} token")
    return idx


def _check(message: dict) -> tuple[str, str]:
    """Validate one message so a typo in a dataset fails here, not as silent garbage."""
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message content must be a string, got {type(content).__name__}")
    return role, content


def _encode(tok: Tokenizer, text: str) -> list[int]:
    """Content ids with no implicit specials (empty content is legal and encodes to nothing)."""
    return tok.encode(text, add_special_tokens=False).ids if text else []


def render_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Ids of a whole conversation and a mask that is True where the model should learn.

    Only assistant content and the <|end|> closing each assistant turn are trained on, so
    the model learns to answer and to stop, never to imitate the user.
    """
    ids = [_special_id(tok, BOS)]
    mask = [False]
    end = _special_id(tok, END)
    for message in messages:
        role, content = _check(message)
        learn = role == "assistant"
        body = _encode(tok, content)
        ids += [_special_id(tok, f"<|{role}|>"), *body, end]
        mask += [False, *([learn] * len(body)), learn]
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the conversation so far plus <|assistant|>, ready for generation."""
    ids, _ = render_chat(tok, messages)
    return ids + [_special_id(tok, ASSISTANT)]


def stop_ids(tok: Tokenizer) -> list[int]:
    """Ids that end generation: the end of the assistant turn, or end of text."""
    return [_special_id(tok, END), _special_id(tok, EOS)]
