"""Users' feedback turned into the next round of training data, in the alignment stage's formats.

- A preferred answer the user wrote makes a preference pair: the prompt, their answer as chosen
  and the model's as rejected (`{"prompt", "chosen", "rejected"}`, what `llmforge dpo` and
  `llmforge reward` read through align/pairs.py).
- A thumbs-up, or a rating at or above `min_rating`, makes an SFT example of the model's own
  answer; a preferred answer makes one too (`{"messages": [...]}`, what `llmforge sft` reads).

Chat requests keep their whole conversation as the prompt; completion requests become one user
turn. Feedback that cannot become training data (a request with several answers, a prompt that
is not text, nothing to learn from) is counted by reason, not exported.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from llmforge.monitor.store import RequestStore

PREFERENCES_FILE = "preferences.jsonl"
SFT_FILE = "sft.jsonl"


def export_feedback(store: RequestStore, out_dir: Path, min_rating: int = 4) -> dict:
    """Write out_dir/preferences.jsonl and out_dir/sft.jsonl; return what was written and what
    was set aside, by reason."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs, examples, skipped = [], [], Counter()
    for row in store.feedback_with_requests():
        try:
            prompt = _prompt(row)
        except ValueError as e:
            skipped[str(e)] += 1
            continue
        preferred = (row["preferred"] or "").strip()
        liked = row["thumb"] == 1 or (row["rating"] or 0) >= min_rating
        if preferred and preferred != row["output"]:
            pairs.append({"prompt": prompt, "chosen": preferred, "rejected": row["output"],
                          "feedback_id": row["feedback_id"]})
            examples.append(_example(prompt, preferred, row["feedback_id"]))
        elif liked and row["output"].strip():
            examples.append(_example(prompt, row["output"], row["feedback_id"]))
        else:
            skipped["nothing_to_learn"] += 1
    _write(out_dir / PREFERENCES_FILE, pairs)
    _write(out_dir / SFT_FILE, examples)
    return {"preference_pairs": len(pairs), "sft_examples": len(examples),
            "set_aside": dict(skipped)}


def _prompt(row: dict) -> list[dict]:
    if row["sampling"].get("n", 1) != 1:
        raise ValueError("several_answers")
    if row["endpoint"] == "chat.completions":
        return json.loads(row["prompt"])
    if _is_json_list(row["prompt"]):  # several prompts, or token ids: not one text
        raise ValueError("prompt_not_text")
    return [{"role": "user", "content": row["prompt"]}]


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


def _example(prompt: list[dict], answer: str, feedback_id: int) -> dict:
    return {"messages": [*prompt, {"role": "assistant", "content": answer}],
            "feedback_id": feedback_id}


def _write(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
