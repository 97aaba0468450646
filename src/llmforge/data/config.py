"""Settings of the data stage; plain typed fields so a recipe's YAML can be checked against them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where the raw text comes from and which documents are good enough to keep."""

    # "stdlib" = the running interpreter's own standard library (always available, no download);
    # otherwise a folder (read recursively) or a glob of .txt / .jsonl / .parquet files.
    source: str = "stdlib"
    # Field of a .jsonl object / column of a .parquet file that holds the document text.
    text_field: str = "text"
    # Shorter documents carry too little context to learn from (stubs, empty __init__ files).
    min_chars: int = 200
    # Longer ones are usually dumps or generated tables; they also bloat a single training window.
    max_chars: int = 200_000
    # A longer line means minified, encoded or machine-generated text, not prose or code.
    max_line_chars: int = 1000
    # Letters over non-whitespace characters; below this the document is mostly numbers,
    # symbols or binary noise.
    min_alpha_frac: float = 0.25
    # Drop files whose header says they were generated ("generated from", "do not edit").
    drop_generated: bool = True
    # Stop after this many input records (0 = all): for quick runs and tests.
    max_docs: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 <= min_chars <= max_chars, got {self.min_chars}, "
                             f"{self.max_chars}")
        if self.max_line_chars < 1:
            raise ValueError(f"max_line_chars must be >= 1, got {self.max_line_chars}")
        if not 0.0 <= self.min_alpha_frac <= 1.0:
            raise ValueError(f"min_alpha_frac must be in [0, 1], got {self.min_alpha_frac}")
        if self.max_docs < 0:
            raise ValueError(f"max_docs must be >= 0 (0 = all), got {self.max_docs}")
