"""Safety flags on served requests: personal data, toxic words and jailbreak attempts.

Every check is a cheap heuristic, so it can run on each request and its rate can be tracked per
model version; a flag marks a request for a person to look at, not a verdict. Personal data and
toxicity reuse the data stage's detectors (`redact`, the toxicity word list), so training data
and traffic are judged alike. What they miss: personal data written unusually (a phone number
spelled out, a street address, a name), abuse without listed words (threats, insults built from
ordinary words, other languages), and jailbreaks phrased in new words, paraphrased, encoded
(base64, leetspeak) or planted in a forged assistant turn. The jailbreak patterns match the
stock phrasings of well-known attacks and favour precision: they would rather miss a novel
attack than flag a user asking how to enable developer mode on a phone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmforge.data.filters.pii import redact
from llmforge.data.filters.toxicity import load_wordlist

FLAGS = ("output:pii", "output:toxicity", "prompt:jailbreak", "prompt:pii", "prompt:toxicity")

# Terms that make a persona "unrestricted", shared by several patterns below.
_UNRESTRICTED = (
    r"\b(?:unrestricted|unfiltered|uncensored|amoral|never\s+refuses?"
    r"|(?:no|without(?:\s+any)?)\s+(?:restrictions|filters|limits|limitations|rules|morals"
    r"|ethics|censorship|guidelines|boundaries))\b"
)
# "Give me the system prompt for a support bot" asks for a new one, so "for a(n)" ends no match.
_SYSTEM_PROMPT = (
    r"(?:(?:full|entire|complete|exact|original)\s+)?(?:system|initial|hidden|secret)\s+"
    r"(?:prompt|message|instructions)\b(?!\s+for\s+an?\b)"
)

# Our own patterns for the stock phrasings of well-known jailbreaks and prompt injections, all
# case-insensitive. "DAN" is matched in capitals only, so that a person called Dan is not.
_JAILBREAKS = {
    "ignore_instructions": (
        r"\b(?:ignore|disregard|forget|override)\s+(?:all\s+)?(?:(?:of\s+)?"
        r"(?:the|your|my|these|those|any)\s+)?(?:(?:previous|prior|above|earlier|preceding)\s+"
        r"(?:instructions|rules|directions|guidelines|prompts?)"
        r"|(?:instructions|rules|directions)\s+(?:above|before\s+this))\b"
    ),
    "dan": (
        r"\b(?:you\s+are|you're|act\s+as|pretend\s+to\s+be|become)\s+(?:now\s+)?(?-i:DAN)\b"
        r"|(?-i:\bDAN)\s+(?:mode|prompt|\d+(?:\.\d+)?\b)"
        r"|(?:(?-i:\bDAN\b)|stands\s+for)\W{1,5}do\s+anything\s+now\b"
        r"|[\"“]do\s+anything\s+now\b"
    ),
    "developer_mode": (
        r"\b(?:chatgpt|gpt|ai|assistant|chatbot|model)\s+with\s+developer\s+mode\s+"
        r"(?:enabled|activated|on)\b"
        r"|\b(?:simulate|emulate)\s+(?:the\s+)?developer\s+mode\b"
        r"|[\"“(]developer\s+mode\s+(?:enabled|output)\b"
    ),
    "not_bound": (
        r"\b(?:you\s+are|you're|you\s+have\s+been|you've\s+been)\s+(?:now\s+)?"
        r"(?:no\s+longer|not|freed\s+from\s+being)\s+(?:bound|restricted|limited|constrained)"
        r"\s+by\s+(?:[\w'’-]+\s+){0,3}?(?:rules|guidelines|polic(?:y|ies)|restrictions|ethics"
        r"|programming|filters)\b"
    ),
    "unrestricted_ai": (
        r"\b(?:pretend|act|behave|roleplay|role-play|respond|imagine)\s+"
        r"(?:to\s+be|as|like|you\s+are|that\s+you\s+are)\s+(?:an?\s+|the\s+)?(?:\w+\s+){0,3}?"
        r"(?:(?:unrestricted|unfiltered|uncensored|amoral)\s+(?:\w+\s+)?"
        r"(?:ai|assistant|chatbot|bot|model|language\s+model)\b"
        r"|(?:ai|assistant|chatbot|bot|model)\s+(?:with\s+no|without(?:\s+any)?|free\s+(?:of|from))"
        r"\s+(?:\w+\s+)?(?:restrictions|filters|limits|limitations|rules|guidelines|censorship"
        r"|morals|ethics)\b)"
    ),
    "jailbroken": (
        r"\b(?:you\s+are|you're|you\s+have\s+been|you've\s+been)\s+(?:now\s+)?jailbroken\b"
        r"|\bjailbr(?:eak|oken)\s+(?:mode|persona|version|ai|chatgpt|gpt|assistant|model)\b"
    ),
    "system_prompt_leak": (
        r"\b(?:reveal|repeat|print|show|output|display|recite|leak|dump|disclose|tell\s+me"
        r"|give\s+me|write\s+out)\s+(?:me\s+|us\s+)?(?:your|the)\s+" + _SYSTEM_PROMPT
        + r"|\bwhat\s+(?:is|are|was|were)\s+your\s+" + _SYSTEM_PROMPT
        + r"|\b(?:repeat|print|output|reveal|recite)\s+(?:all\s+|everything\s+|the\s+)?"
        r"(?:text|words|lines|instructions|everything)\s+above\b"
        r"(?=\s*(?:verbatim|word\s+for\s+word|starting|beginning|including|$|[.,;:!?\"']))"
    ),
    "stay_in_character": (
        r"\b(?:stay|remain)\s+in\s+character\b[\s\S]{0,300}?" + _UNRESTRICTED
        + r"|" + _UNRESTRICTED + r"[\s\S]{0,300}?\b(?:stay|remain)\s+in\s+character\b"
    ),
    "evil_persona": (
        r"\bopposite\s+mode\b|\bevil\s+confidant\b|\banti-?gpt\b"
        r"|\b(?:you\s+are|you're|act\s+as|pretend\s+(?:to\s+be|you\s+are)|respond\s+as|become)"
        r"\s+(?:now\s+)?(?:an?\s+|my\s+|the\s+)?evil\s+(?:version\s+of\s+(?:yourself|chatgpt)"
        r"|ai|assistant|chatbot)\b"
    ),
    "no_censorship": (
        r"\b(?:answer|respond|reply|speak|talk)\w*\s+(?:\w+\s+){0,5}?without\s+(?:any\s+)?"
        r"(?:censorship|censoring|restrictions|filters|filtering|limitations|morals"
        r"|moralizing|ethical\s+guidelines)\b(?!\s+on\b)"
        r"|\buncensored\s+(?:answer|response|reply|version\s+of\s+you)\b"
    ),
}
JAILBREAK_PATTERNS = {name: re.compile(p, re.IGNORECASE) for name, p in _JAILBREAKS.items()}


def jailbreak_matches(text: str) -> list[str]:
    """Names of the jailbreak patterns found in `text`."""
    return [name for name, pattern in JAILBREAK_PATTERNS.items() if pattern.search(text)]


def _prompt_text(prompt: str | list[Any]) -> str:
    """A completion prompt as is; for chat, the user and system messages joined (assistant turns,
    when genuine, were flagged as outputs when served); malformed entries are skipped."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(
        m["content"] for m in prompt
        if isinstance(m, dict) and m.get("role") in ("user", "system")
        and isinstance(m.get("content"), str)
    )


@dataclass(frozen=True)
class SafetyChecker:
    """Flags a request's prompt and output; see `FLAGS` for the names."""

    # The data filter allows 1 listed word in 100 (0.01), since an incidental curse in a long
    # article is no reason to drop it. A chat turn is short and addressed to a person: one slur
    # in a reply is already an incident, so by default any listed term flags.
    toxicity_threshold: float = 0.0
    wordlist: str = ""  # "" = the data stage's built-in list; otherwise a file, one term a line

    def flags(self, prompt: str | list[Any], output: str) -> list[str]:
        """Sorted unique flags for one request; jailbreaks are looked for in the prompt only."""
        toxicity = load_wordlist(self.wordlist)
        prompt_text = _prompt_text(prompt)
        found: set[str] = set()
        for side, text in (("prompt", prompt_text), ("output", output)):
            if redact(text)[1]:
                found.add(f"{side}:pii")
            if toxicity(text) > self.toxicity_threshold:
                found.add(f"{side}:toxicity")
        if jailbreak_matches(prompt_text):
            found.add("prompt:jailbreak")
        return sorted(found)


@dataclass(frozen=True)
class SafetyCounts:
    """Stored requests and flags per model version."""

    requests: Counter[str]  # model version -> requests
    flags: dict[str, Counter[str]]  # model version -> flag -> requests carrying it

    def rate(self, version: str, flag: str) -> float:
        """Share of the version's requests carrying `flag` (0 for an unknown version)."""
        total = self.requests[version]
        return self.flags[version][flag] / total if total else 0.0


def count_flags(rows: Iterable[Mapping[str, Any]]) -> SafetyCounts:
    """Count store rows (dicts with "model_version" and "safety_flags") per model version, each
    flag once per row; a version whose requests carry no flags still gets an empty Counter."""
    requests: Counter[str] = Counter()
    flags: dict[str, Counter[str]] = {}
    for row in rows:
        version = row["model_version"]
        requests[version] += 1
        flags.setdefault(version, Counter()).update(set(row["safety_flags"]))
    return SafetyCounts(requests, flags)
