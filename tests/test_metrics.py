"""Metrics and the judge's prompt and parsing, on hand-made cases."""

from __future__ import annotations

import pytest

from mlx_gemma_tune import judge
from mlx_gemma_tune import metrics as M


@pytest.mark.parametrize("pred,ref,want", [
    ("Paris.", "paris", 1.0),
    ("The Eiffel Tower", "eiffel tower", 1.0),  # articles dropped
    ("  Paris\n", "Paris", 1.0),
    ("Ｐａｒｉｓ", "Paris", 1.0),  # NFKC: full-width letters
    ("Zürich", "Zurich", 0.0),  # accents are meaningful
    ("", "Paris", 0.0),
    ("", "", 1.0),
    ("42", "42.0", 0.0),  # numbers compare as written
    ("3,5", "3.5", 1.0),  # punctuation is dropped: both become "3 5" (decimal comma or point)
    ("東京", "東京。", 1.0),
])
def test_exact(pred, ref, want):
    assert M.exact(pred, ref) == want


def test_exact_without_normalisation_options():
    assert M.exact("Paris.", "paris", lower=False) == 0.0
    assert M.exact("the cat", "cat", articles=False) == 0.0


def test_token_f1():
    assert M.f1("the cat sat", "the cat sat") == 1.0
    assert M.f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert M.f1("", "cat") == 0.0 and M.f1("", "") == 1.0
    assert M.f1("dog", "cat") == 0.0
    assert M.f1("1 2 2", "2 2 3") == pytest.approx(2 / 3)  # multiset overlap: two 2s


def test_rouge_l():
    assert M.rouge_l("a b c d", "a b c d") == 1.0
    # LCS of [police, killed, gunman] and [police, kill, gunman] is 2 of 3 tokens each way.
    assert M.rouge_l("police killed gunman", "police kill gunman") == pytest.approx(2 / 3)
    assert M.rouge_l("", "x") == 0.0 and M.rouge_l("", "") == 1.0
    assert M.rouge_l("y x", "x y") == pytest.approx(0.5)


def test_json_scores():
    ref = '{"name": "Ana", "age": 31, "city": "Lisbon"}'
    assert M.json_scores(ref, ref) == {"json_valid": 1.0, "json_fields": 1.0}
    assert M.json_scores('```json\n{"name": "Ana", "age": 31, "city": "Porto"}\n```', ref)["json_fields"] == \
        pytest.approx(2 / 3)
    assert M.json_scores('{"name": "Ana", "age": "31", "city": "Lisbon"}', ref)["json_fields"] == pytest.approx(2 / 3)
    assert M.json_scores("name: Ana", ref) == {"json_valid": 0.0, "json_fields": 0.0}
    assert M.json_scores("", ref) == {"json_valid": 0.0, "json_fields": 0.0}
    assert M.json_scores("[1, 2]", "[1, 2]") == {"json_valid": 1.0, "json_fields": 1.0}
    assert M.json_scores('{"ünï": "ç"}', '{"ünï": "ç"}')["json_fields"] == 1.0


def test_classification_per_class():
    preds = ["spam", "spam", "ham", "ham", "Spam.", "ham"]
    refs = ["spam", "ham", "ham", "ham", "spam", "spam"]
    r = M.classification(preds, refs)
    assert r["accuracy"] == pytest.approx(4 / 6)
    spam, ham = r["per_class"]["spam"], r["per_class"]["ham"]
    assert spam["precision"] == pytest.approx(2 / 3) and spam["recall"] == pytest.approx(2 / 3)
    assert ham["precision"] == pytest.approx(2 / 3) and ham["recall"] == pytest.approx(2 / 3)
    assert spam["support"] == 3 and ham["support"] == 3
    assert r["macro_f1"] == pytest.approx(2 / 3)
    assert M.classification([], [])["accuracy"] == 0.0


GOOD = '{"relevance": 8, "accuracy": 7, "completeness": 6, "fluency": 9, "usefulness": 7, "overall": 7, "reason": "ok"}'


@pytest.mark.parametrize("reply,overall", [
    (GOOD, 7.0),
    ("Here is my grading:\n```json\n" + GOOD + "\n```", 7.0),
    ('{"note": 1} then ' + GOOD, 7.0),  # the first object is not a judgement, the second is
    (GOOD.replace('"overall": 7', '"overall": 11'), None),  # out of range
    (GOOD.replace('"fluency": 9, ', ""), None),  # a criterion missing
    (GOOD.replace("7,", '"seven",', 1), None),
    ("I think it is a 7/10.", None),
    ("", None),
])
def test_parse_judgement(reply, overall):
    parsed = judge.parse_judgement(reply)
    assert (parsed["overall"] if parsed else None) == overall
    if parsed:
        assert parsed["reason"] == "ok" and set(parsed) == set(judge.CRITERIA) | {"overall", "reason"}


def test_judge_prompt_carries_rubric_question_reference_answer():
    msgs = judge.judge_messages("What is 2+2?", "4", "four")
    assert msgs[0]["role"] == "system" and all(c in msgs[0]["content"] for c in judge.CRITERIA)
    assert "QUESTION:\nWhat is 2+2?" in msgs[1]["content"] and "REFERENCE:\n4" in msgs[1]["content"]
    assert msgs[1]["content"].endswith("ANSWER:\nfour")


def test_judge_summary_counts_unparsable():
    js = [{"parsed": True, **{k: 6.0 for k in judge.CRITERIA}, "overall": 6.0, "reason": ""},
          {"parsed": True, **{k: 8.0 for k in judge.CRITERIA}, "overall": 8.0, "reason": ""},
          {"parsed": False, "attempts": 2, "raw": "?"}]
    s = judge.summarize(js)
    assert s["judged"] == 3 and s["parsed"] == 2 and s["unparsable"] == 1 and s["overall"] == 7.0
    assert judge.summarize([{"parsed": False}])["overall"] is None
