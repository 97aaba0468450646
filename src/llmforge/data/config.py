"""Settings of the data stage; plain typed fields so a recipe's YAML can be checked against them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _code_steps() -> list[Any]:
    from llmforge.data.steps import CODE_STEPS

    return list(CODE_STEPS)


@dataclass
class DataConfig:
    """Where the raw text comes from, which steps it goes through, and where the work runs."""

    # "stdlib" = the running interpreter's own standard library (always available, no download);
    # otherwise a folder (read recursively), a glob, or hf://owner/name for a Hugging Face
    # dataset. Formats: .txt, .jsonl(.gz/.zst), .parquet, .csv, WARC/WET. Several sources are
    # separated by commas ("stdlib,books/*.txt") and read in that order.
    source: str = "stdlib"
    # Field of a .jsonl object / column of a .parquet or .csv file that holds the document text.
    text_field: str = "text"
    # The steps, in order (see data/steps.py for names and parameters). The default suits code
    # and is what the demo uses; recipes/web-data.yaml has the FineWeb-style chain for web text.
    steps: list[Any] = field(default_factory=_code_steps)
    executor: str = "local"  # local (processes on this machine) | ray
    workers: int = 0  # 0 = one per CPU core (local) or the cluster's (ray)
    ray_address: str = ""  # "" = start a local Ray instance; "auto" or ray://host:port to join
    # Large files are split into shards of about this size, so one file is not one worker's job.
    shard_mb: int = 64
    # Write every set-aside document, with step, reason and text, to data/rejects/.
    write_rejects: bool = True
    # Stop after this many input records (0 = all): for quick runs and tests.
    max_docs: int = 0

    def __post_init__(self) -> None:
        from llmforge.data.executors import EXECUTORS
        from llmforge.data.steps import build_steps

        build_steps(self.steps)  # a bad step name or parameter fails at load time
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, "
                             f"got {self.executor!r}")
        for name in ("workers", "max_docs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.shard_mb < 1:
            raise ValueError(f"shard_mb must be >= 1, got {self.shard_mb}")
