"""The HTML report renders every section of a full run and says "not run" for missing stages."""

from __future__ import annotations

import json
from pathlib import Path

from llmforge.report import write_report

SECTIONS = (
    "Data funnel",
    "Tokenizer",
    "Pretraining",
    "Supervised fine-tuning",
    "Evaluation",
    "Samples before and after SFT",
    "Stage timings",
)


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(path: Path, steps: int, tail: str = "") -> None:
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 5.0 / step, "lr": 1e-3 * step / steps}
        if step % 2 == 0:
            record["val_loss"] = 5.5 / step
        lines.append(json.dumps(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + tail)


def _data(root: Path) -> None:
    _write(root / "data" / "summary.json", {
        "read": 1000, "kept": 700, "dropped": {"too_short": 200, "duplicate": 100},
        "kept_chars": 70_000, "read_chars": 90_000, "elapsed_s": 1.5,
    })


def _full_run(root: Path) -> None:
    _data(root)
    _write(root / "tokenizer" / "summary.json",
           {"vocab_size": 512, "bytes_per_token": 3.2, "elapsed_s": 2.0})
    _write(root / "tokenize" / "summary.json",
           {"train_tokens": 9000, "val_tokens": 1000, "unigram_nats": 5.25, "elapsed_s": 0.5})
    for stage in ("pretrain", "sft"):
        _metrics(root / stage / "metrics.jsonl", steps=6)
        _write(root / stage / "summary.json",
               {"steps": 6, "final_loss": 0.83, "params": 123456, "elapsed_s": 10.0})
    model = {
        "pretrain": ("def f(x):\n    return x <module>", "I am a cat"),
        "sft": ("print('hi') & bye", "Hello! How can I help?"),
    }
    _write(root / "eval" / "eval.json", {
        "unigram_nats": 5.25,
        "models": {
            name: {
                "val_loss": loss, "bpb": bpb, "perplexity": ppl,
                "samples": [{"prompt": "def ", "completion": plain}],
                "chat_samples": [{"prompt": "Say hi", "completion": chat}],
            }
            for (name, (plain, chat)), (loss, bpb, ppl) in zip(
                model.items(), [(2.345, 1.234, 10.43), (2.111, 1.111, 8.257)], strict=True)
        },
    })
    _write(root / "eval" / "summary.json", {"elapsed_s": 3.0})


def test_full_report(tmp_path: Path) -> None:
    _full_run(tmp_path)
    out = write_report(tmp_path)
    assert out == tmp_path / "report.html"
    html = out.read_text()
    for title in SECTIONS:
        assert title in html
    for number in ("2.345", "1.234", "10.43", "2.111", "8.257", "5.25"):
        assert number in html
    assert "&lt;module&gt;" in html and "<module>" not in html
    assert "Hello! How can I help?" in html and "I am a cat" in html
    assert html.count("data:image/png;base64,") >= 3
    assert "Not run" not in html
    assert "<script" not in html
    assert '<th class="num">27</th>' in html  # total time: 1.5 + 2 + 0.5 + 10 + 10 + 3


def test_partial_run_with_truncated_metrics(tmp_path: Path) -> None:
    _data(tmp_path)
    _metrics(tmp_path / "pretrain" / "metrics.jsonl", steps=4, tail='{"step": 5, "lo')
    out = write_report(tmp_path, tmp_path / "out" / "r.html")
    html = out.read_text()
    for title in SECTIONS:
        assert title in html
    assert "did not finish" in html
    assert html.count("Not run") == 4  # tokenizer, sft, evaluation, samples
    assert html.count("data:image/png;base64,") == 3  # funnel, pretrain loss, pretrain lr


def test_empty_run_dir(tmp_path: Path) -> None:
    html = write_report(tmp_path / "missing").read_text()
    assert html.count("Not run") == len(SECTIONS)
