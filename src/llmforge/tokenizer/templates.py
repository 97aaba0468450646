"""Render a model's own Jinja chat template the way transformers' `apply_chat_template(...,
tokenize=False)` does, without needing transformers.

The template runs in the same kind of environment transformers builds: an immutable sandbox with
trim_blocks and lstrip_blocks, the loopcontrols extension, a `{% generation %}` block tag (it
only marks assistant text there; here it renders its body), a `tojson` filter that leaves
non-ASCII and HTML characters alone, and the globals `raise_exception`, `strftime_now`, a
restricted `dict` and a `namespace` that refuses underscore names. Inputs are reduced to plain
JSON-like data first, as transformers does, so a template sees the same values.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# transformers copies a message's reasoning under the name templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers records where assistant text lies;
    the rendered text is just the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot store underscore-prefixed attributes on a namespace, "
            f"got {name!r}"
        )


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing dunder and other underscore names (CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 (Jinja's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def _plain(value: Any) -> Any:
    """Only plain JSON-like data reaches the sandbox; anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) carry methods: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic messages (OpenAI SDK)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _messages(messages: list[Any]) -> list[dict]:
    """Messages as transformers hands them to the template: plain dicts, None-valued keys
    dropped, reasoning copied to `reasoning_content` and `thinking`."""
    if not messages:
        raise ValueError("cannot render a chat template for an empty conversation")
    out = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise ValueError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    **special_tokens: Any,
) -> str:
    """The text `tokenizer.apply_chat_template(messages, tokenize=False, ...)` gives for a
    tokenizer whose chat_template is `template`.

    `special_tokens` are what transformers passes from the tokenizer's special tokens map
    (bos_token="<s>", eos_token="</s>", ...) plus any extra template variables. Tools must be
    JSON schemas (dicts). A template that fails, including through `raise_exception`, raises
    ValueError with the template's message.
    """
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise ValueError("tools must be JSON schemas (dicts)")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error on line {e.lineno}: {e.message}") from e
    variables = {
        **_plain(special_tokens),
        "messages": _messages(messages),
        "tools": _plain(tools),
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return compiled.render(**variables)
    except jinja2.TemplateError as e:
        raise ValueError(e.message or type(e).__name__) from e
    except (TypeError, AttributeError, KeyError, IndexError, ArithmeticError) as e:
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e


def load_chat_template(model_dir: Path) -> str | None:
    """The model directory's chat template, looked up as transformers does: a
    chat_template.jinja file first, then tokenizer_config.json's "chat_template" (a string, or
    a list of {"name", "template"} of which "default" is taken). None when there is none."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        try:
            template = {t["name"]: t["template"] for t in template}
        except (TypeError, KeyError):
            raise ValueError(f"{config_file}: chat_template list entries need 'name' and "
                             f"'template'") from None
    if isinstance(template, dict):
        if "default" not in template:
            raise ValueError(f"{config_file} has chat templates {sorted(template)} but no "
                             f"'default'")
        return template["default"]
    raise ValueError(f"{config_file}: chat_template must be a string or a list of "
                     f"{{name, template}}, got {type(template).__name__}")
