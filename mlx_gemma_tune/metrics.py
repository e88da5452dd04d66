"""Task metrics on generated answers against references. Pure Python, no model needed.

exact          exact match after normalisation (case, punctuation, articles, whitespace)
f1             token-level F1 (bag of words, SQuAD-style)
rougeL         ROUGE-L F-measure (longest common subsequence of tokens)
json           answer parses as JSON, and the share of the reference's fields it gets exactly right
classification accuracy, with per-class precision / recall / F1 (references are labels)
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter

TEXT_METRICS = ("exact", "f1", "rougeL")
ALL_METRICS = ("loss", "exact", "f1", "rougeL", "json", "classification", "preference")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ASCII_PUNCT = set(string.punctuation)


def normalize(text: str, *, lower: bool = True, punctuation: bool = True, articles: bool = True) -> str:
    """NFKC, then optionally lowercase, drop punctuation (any Unicode P* character) and English
    articles, and collapse whitespace."""
    text = unicodedata.normalize("NFKC", text or "")
    if lower:
        text = text.lower()
    if punctuation:
        text = "".join(" " if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P") else ch
                       for ch in text)
    if articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact(pred: str, ref: str, **norm) -> float:
    return float(normalize(pred, **norm) == normalize(ref, **norm))


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


def f1(pred: str, ref: str) -> float:
    p, r = _tokens(pred), _tokens(ref)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[-1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    p, r = _tokens(pred), _tokens(ref)
    if not p and not r:
        return 1.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def parse_json(text: str):
    """The JSON value in an answer (a ```json fence is allowed), or raise ValueError."""
    s = (text or "").strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, flags=re.DOTALL)
    if fence:
        s = fence.group(1)
    return json.loads(s)


def json_scores(pred: str, ref: str) -> dict[str, float]:
    """{"json_valid": 0/1, "json_fields": share of the reference object's fields matched exactly}."""
    try:
        got = parse_json(pred)
        valid = 1.0
    except ValueError:
        got, valid = None, 0.0
    try:
        want = parse_json(ref)
    except ValueError:
        want = None
    if isinstance(want, dict) and want:
        fields = sum(1 for k, v in want.items() if isinstance(got, dict) and k in got and got[k] == v) / len(want)
    else:
        fields = float(valid and got == want)
    return {"json_valid": valid, "json_fields": fields}


def classification(preds: list[str], refs: list[str]) -> dict:
    """Accuracy and per-class precision / recall / F1; labels compared after normalisation."""
    p = [normalize(x) for x in preds]
    r = [normalize(x) for x in refs]
    labels = sorted(set(r))
    per_class = {}
    for label in labels:
        tp = sum(1 for a, b in zip(p, r) if a == label and b == label)
        fp = sum(1 for a, b in zip(p, r) if a == label and b != label)
        fn = sum(1 for a, b in zip(p, r) if a != label and b == label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f, "support": tp + fn}
    accuracy = sum(a == b for a, b in zip(p, r)) / len(r) if r else 0.0
    macro = sum(c["f1"] for c in per_class.values()) / len(per_class) if per_class else 0.0
    return {"accuracy": accuracy, "macro_f1": macro, "per_class": per_class}


def row_scores(pred: str, ref: str, metrics: tuple[str, ...]) -> dict[str, float]:
    out = {}
    if "exact" in metrics:
        out["exact"] = exact(pred, ref)
    if "f1" in metrics:
        out["f1"] = f1(pred, ref)
    if "rougeL" in metrics:
        out["rougeL"] = rouge_l(pred, ref)
    if "json" in metrics:
        out.update(json_scores(pred, ref))
    return out
