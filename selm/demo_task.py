"""The demo task: upbeat one-sentence answers about mundane topics, with a proxy ranker and a
distinct gold judge. Both are offline, deterministic and fast.

- Prompts (selm/data/demo/, built by scripts/build_demo_prompts.py) ask for one sentence about a
  mundane topic ("a tax form", "a queue at the bank"). Training and evaluation topics are disjoint.
- Training ranker (`train_ranker`): VADER's compound sentiment, minus 0.5 for answers under 3 or
  over 60 words. A cheap proxy that knows nothing about the topic.
- Gold judge (`gold_judge`): TextBlob polarity (a different sentiment lexicon), minus 0.5 each for
  leaving the topic (no topic keyword), a length outside 5..40 words, or repetition (fewer than
  half the words distinct). What we actually want: warm AND on topic AND a real sentence.

The start model writes mostly neutral sentences, so high gold (>= 0.5) is rare at the start: the
policy has to find such answers by sampling, which is where exploration can matter. The proxy can
be gamed by off-topic gushing; the gold judge catches that, so a win in gold is a real win.
Measurements: notes/demo_task.md.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "data" / "demo"
WORD = re.compile(r"[A-Za-z']+")


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def _keywords() -> dict[str, list[str]]:
    out = {}
    for name in ("train_prompts.jsonl", "eval_prompts.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            row = json.loads(line)
            out[row["prompt"]] = row["keywords"]
    return out


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def train_ranker(prompt: list[dict], responses: list[str]) -> list[float]:
    """VADER compound sentiment in [-1, 1], minus 0.5 for fewer than 3 or more than 60 words."""
    out = []
    for r in responses:
        n = len(_words(r))
        out.append(_vader().polarity_scores(r)["compound"] - (0.5 if n < 3 or n > 60 else 0.0))
    return out


def on_topic(prompt_text: str, response: str) -> bool:
    keywords = _keywords().get(prompt_text)
    if keywords is None:  # a prompt from outside the task: no topic check
        return True
    words = _words(response)
    return any(w.startswith(k) for k in keywords for w in words)


def gold_judge(prompt: list[dict], responses: list[str]) -> list[float]:
    """TextBlob polarity in [-1, 1], minus 0.5 each for off-topic, length outside 5..40 words, and
    repetition (distinct words < half). Range [-2.5, 1]."""
    from textblob import TextBlob

    text = _prompt_text(prompt)
    out = []
    for r in responses:
        words = _words(r)
        score = TextBlob(r).sentiment.polarity if r.strip() else 0.0
        if not on_topic(text, r):
            score -= 0.5
        if not 5 <= len(words) <= 40:
            score -= 0.5
        if words and len(set(words)) < 0.5 * len(words):
            score -= 0.5
        out.append(float(score))
    return out
