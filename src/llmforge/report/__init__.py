"""Run reports: one self-contained HTML page per run directory."""

from llmforge.report.html import write_report

__all__ = ["write_report"]
