"""The demo task: upbeat one-sentence answers about mundane topics, with a proxy ranker and a
distinct gold judge. Both are offline, deterministic and fast (timed in notes/demo_task.md, section 3).

- Prompts (selm/data/demo/, built by scripts/build_demo_prompts.py) ask for one sentence about a
  mundane topic ("a tax form", "a queue at the bank"). Training and evaluation topics are disjoint.
- Training ranker (`train_ranker`): VADER's compound sentiment, minus 0.5 for answers under 3 or
  over 60 words. A cheap proxy that knows nothing about the topic or about finishing a sentence.
- Gold judge (`gold_judge`): TextBlob polarity (a different sentiment lexicon) minus 0.5 for each
  broken rule (`gold_parts`): off topic, length outside 5..40 words, repetition, or an unfinished
  sentence; an answer that breaks any rule scores at most 0.25. What we actually want: warm AND
  on topic AND one real sentence.

The start model writes mostly neutral sentences, so high gold (>= 0.5) is rare at the start (about
1 sample in 9): the policy has to find such answers by sampling, which is where exploration can
matter. The proxy can be gamed (off-topic gushing; piling up positive words until the answer runs
past max_new_tokens and is cut); the gold judge penalises both, so a gain in gold is a real gain.
Measurements: notes/demo_task.md.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent.parent / "data" / "demo"
WORD = re.compile(r"[A-Za-z']+")
# A finished sentence ends in . ! or ?, possibly followed by quotes, brackets or emoji.
FINISHED = re.compile(r"[.!?][^A-Za-z0-9]*$")
PENALTY = 0.5
# A rule-breaker scores at most this, so high gold (>= 0.5) needs no broken rule: "Great kettle!"
# (too short) or cut-off gushing cannot reach it on polarity alone. (A penalty of 1 per rule would
# do the same but doubles the spread of gold and hides the proxy's signal: notes/demo_task.md.)
RULE_BREAKER_CAP = 0.25
# Words of the prompt templates: what is left of a prompt without them names its topic (used for
# prompts that are not in the demo files, which carry no keyword list).
TEMPLATE_WORDS = set(
    "a an the of about in on for to me you do what think write one sentence line single short "
    "caption photo describe describing review tell friend give note".split()
)


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def _keywords() -> dict[str, list[str]]:
    out = {}
    for name in ("train_prompts.jsonl", "eval_prompts.jsonl", "evidence_eval_prompts.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            row = json.loads(line)
            out[row["prompt"]] = row["keywords"]
    return out


def _prompt_text(prompt) -> str:
    """The last user turn (a plain string prompt is accepted too)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def topic_keywords(prompt_text: str) -> list[str]:
    """Word prefixes of which a response must contain one to be on topic: the list stored with a demo
    prompt (it includes synonyms), else the prompt's own non-template words (plural 's' dropped)."""
    stored = _keywords().get(prompt_text)
    if stored is not None:
        return stored
    return [w[:-1] if w.endswith("s") and len(w) > 3 else w
            for w in _words(prompt_text) if w not in TEMPLATE_WORDS and len(w) > 2]


def on_topic(prompt_text: str, response: str) -> bool:
    keywords = topic_keywords(prompt_text)
    if not keywords:  # nothing to check against
        return True
    return any(w.startswith(k) for k in keywords for w in _words(response))


def train_ranker(prompt: list[dict], responses: list[str]) -> list[float]:
    """VADER compound sentiment in [-1, 1], minus 0.5 for fewer than 3 or more than 60 words."""
    out = []
    for r in responses:
        n = len(_words(r))
        out.append(float(_vader().polarity_scores(r)["compound"]) - (PENALTY if n < 3 or n > 60 else 0.0))
    return out


def gold_parts(prompt_text: str, response: str) -> dict:
    """The gold judge's parts for one response: TextBlob polarity and the rules it breaks."""
    from textblob import TextBlob

    words = _words(response)
    text = response.strip()
    return {
        "polarity": float(TextBlob(text).sentiment.polarity) if text else 0.0,
        "off_topic": not on_topic(prompt_text, response),
        "bad_length": not 5 <= len(words) <= 40,
        # Fewer than half the words distinct: loops like "great great great kettle".
        "repetitive": bool(words) and len(set(words)) < 0.5 * len(words),
        # No closing punctuation after 20+ words: almost always a sentence cut by max_new_tokens
        # (short captions legitimately end without a full stop, so they are not counted).
        "unfinished": len(words) > 20 and not FINISHED.search(text),
    }


def gold_judge(prompt: list[dict], responses: list[str]) -> list[float]:
    """TextBlob polarity in [-1, 1], minus 0.5 per broken rule (off topic, length outside 5..40
    words, repetition, unfinished sentence), and at most 0.25 if any rule is broken. Range [-3, 1];
    high gold (>= 0.5) needs no broken rule."""
    text = _prompt_text(prompt)
    out = []
    for r in responses:
        parts = gold_parts(text, r)
        broken = sum(parts[k] for k in ("off_topic", "bad_length", "repetitive", "unfinished"))
        score = parts["polarity"] - PENALTY * broken
        out.append(min(score, RULE_BREAKER_CAP) if broken else score)
    return out
