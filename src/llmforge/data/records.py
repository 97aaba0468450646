"""What flows through the data pipeline: documents, the verdicts of steps, and the set-aside."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Document:
    """One unit of text; `id` is unique within its source, `source` names the corpus."""

    id: str
    text: str
    source: str
    # What steps learned about the document (language, scores, redaction counts), kept with it.
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input record set aside; `reason` is the stable key counted in the summary."""

    id: str
    source: str
    reason: str
    detail: str = ""
    chars: int = 0


Record = Document | Rejected


@dataclass(frozen=True, slots=True)
class Drop:
    """A filter's verdict against a document; `reason` is the key counted in the summary."""

    reason: str
    detail: str
