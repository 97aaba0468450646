"""Tokenizer stage: train the BPE vocabulary, define the chat format, write token shards."""

from llmforge.tokenizer.bpe import (
    BOS,
    SPECIAL_TOKENS,
    TokenizerConfig,
    load_tokenizer,
    train_tokenizer,
)
from llmforge.tokenizer.chat import CHAT_TEMPLATE, render_chat, render_prompt, stop_ids
from llmforge.tokenizer.shards import TokenizeConfig, TokenShard, open_shard, tokenize_documents

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TokenShard",
    "TokenizeConfig",
    "TokenizerConfig",
    "load_tokenizer",
    "open_shard",
    "render_chat",
    "render_prompt",
    "stop_ids",
    "tokenize_documents",
    "train_tokenizer",
]
