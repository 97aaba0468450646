"""llmforge: the whole life of a language model in one tool."""

__version__ = "0.1.0"
