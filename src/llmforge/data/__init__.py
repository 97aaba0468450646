"""Data stage: raw text in; normalised, deduplicated, filtered Parquet out; every drop counted."""

from llmforge.data.config import DataConfig
from llmforge.data.pipeline import curate

__all__ = ["DataConfig", "curate"]
