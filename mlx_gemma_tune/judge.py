"""A local LLM-as-a-judge (seed 002): a fixed rubric, JSON scores 1-10, one retry, never a crash."""

from __future__ import annotations

import json
import re

CRITERIA = ("relevance", "accuracy", "completeness", "fluency", "usefulness")
RUBRIC = """You are a strict, fair grader. Score the ANSWER to the QUESTION against the REFERENCE answer.
Give each criterion an integer from 1 (very poor) to 10 (excellent):
- relevance: does it address the question?
- accuracy: is it correct, judged against the reference?
- completeness: does it cover what the reference covers?
- fluency: is it clear and well written?
- usefulness: would it help the person who asked?
Then an overall integer score from 1 to 10 and a one-sentence reason.
Reply with one JSON object and nothing else, exactly in this form:
{"relevance": 7, "accuracy": 6, "completeness": 5, "fluency": 9, "usefulness": 6, "overall": 6, "reason": "..."}"""
RETRY = "Your reply was not a valid JSON object of that form. Reply with the JSON object only."


def judge_messages(question: str, reference: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": RUBRIC},
            {"role": "user", "content": f"QUESTION:\n{question}\n\nREFERENCE:\n{reference}\n\nANSWER:\n{answer}"}]


def parse_judgement(text: str) -> dict | None:
    """The scores in a judge reply, or None. Accepts a JSON object anywhere in the text (fenced or not)."""
    for match in re.finditer(r"\{.*?\}", text or "", flags=re.DOTALL):
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        scores = {}
        for key in CRITERIA + ("overall",):
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
                break
            scores[key] = float(value)
        else:
            reason = obj.get("reason")
            scores["reason"] = reason.strip() if isinstance(reason, str) else ""
            return scores
    return None


class Judge:
    """Scores answers with a local MLX model (greedy), retrying an unparsable reply once."""

    def __init__(self, model: str, max_tokens: int = 160):
        from mlx_gemma_tune.generate import ChatSession, Sampling

        self.session = ChatSession.open(model, sampling=Sampling(temp=0.0, max_tokens=max_tokens))

    def score(self, question: str, reference: str, answer: str) -> dict:
        messages = judge_messages(question, reference, answer)
        reply = "".join(self.session.stream(messages))
        scores = parse_judgement(reply)
        attempts = 1
        if scores is None:
            messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": RETRY}]
            reply = "".join(self.session.stream(messages))
            scores = parse_judgement(reply)
            attempts = 2
        if scores is None:
            return {"parsed": False, "attempts": attempts, "raw": reply[:500]}
        return {"parsed": True, "attempts": attempts, **scores}


def summarize(judgements: list[dict]) -> dict:
    parsed = [j for j in judgements if j.get("parsed")]
    out = {"judged": len(judgements), "parsed": len(parsed), "unparsable": len(judgements) - len(parsed)}
    for key in CRITERIA + ("overall",):
        out[key] = sum(j[key] for j in parsed) / len(parsed) if parsed else None
    return out


def win_rate(tuned: list[dict], base: list[dict]) -> dict:
    """Head to head on the same rows (seed 002's comparison): {"rows": compared (both parsed), "wins",
    "ties", "losses": rows where the tuned answer's overall score is above / equal to / below the base's,
    "win_rate": (wins + ties / 2) / rows, or None when no row could be compared}."""
    pairs = [(t["overall"], b["overall"]) for t, b in zip(tuned, base) if t.get("parsed") and b.get("parsed")]
    wins, ties = sum(t > b for t, b in pairs), sum(t == b for t, b in pairs)
    return {"rows": len(pairs), "wins": wins, "ties": ties, "losses": len(pairs) - wins - ties,
            "win_rate": (wins + ties / 2) / len(pairs) if pairs else None}
