"""`doctor MODEL --plan`: memory plans for 8-64 GB Macs from a config alone."""

from __future__ import annotations

import json

import pytest

from helpers import assert_one_line_error, run_cli


def test_plan_for_a_config_only_gemma4_e4b_prints_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run_cli(["doctor", "google/gemma-4-E4B-it", "--plan", "--json"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.stdout)
    assert p["model"] == "google/gemma-4-E4B-it" and 7.0e9 < p["parameters"] < 8.0e9
    setups = list(dict.fromkeys(r["setup"] for r in p["rows"]))
    assert setups == ["gemma4-e4b-dora", "gemma4-e4b-lora", "gemma4-e4b-qlora"]
    for r in p["rows"]:
        assert r["budget_gb"] == pytest.approx(0.74 * r["mac_gb"], abs=0.01)
        assert r["fits"] == (r["estimate_gb"] <= r["budget_gb"])
        if not r["fits"] and r["fit_estimate_gb"] is not None:
            assert r["fit_estimate_gb"] <= r["budget_gb"] and r["switches"]
    by = {(r["setup"], r["mac_gb"]): r for r in p["rows"]}
    # bigger Macs never fit less; QLoRA needs less than LoRA
    for setup in setups:
        fits = [by[(setup, gb)]["fits"] for gb in (8, 16, 24, 32, 48, 64)]
        assert fits == sorted(fits)
    assert by[("gemma4-e4b-qlora", 16)]["estimate_gb"] < by[("gemma4-e4b-lora", 16)]["estimate_gb"]
    assert by[("gemma4-e4b-lora", 64)]["fits"] and not by[("gemma4-e4b-lora", 8)]["fits"]
    # the human form: a table per recipe with the switches as --set assignments
    res = run_cli(["doctor", "google/gemma-4-E4B-it", "--plan", "--recipe", "gemma4-e4b-lora"])
    assert res.exit_code == 0 and "model.quantize=4" in res.stdout and "64 GB" in res.stdout


def test_the_switches_a_plan_names_make_the_setup_fit():
    """Re-planning with the reported --set assignments gives a setup that fits as is, at the same estimate."""
    from mlx_gemma_tune import plan

    model, recipe = "google/gemma-4-E4B-it", "gemma4-e4b-lora"
    first = plan.plan(model, plan.setups_for(model, [recipe]), sizes=(8, 16, 24))
    fixed = [r for r in first.rows if not r.fits and r.switches != ["does not fit"]]
    assert fixed and all(r.switches for r in fixed)
    for row in fixed:
        sets = tuple(a for s in row.switches for a in s.split(" "))
        again = plan.plan(model, plan.setups_for(model, [recipe], sets), sizes=(row.mac_gb,)).rows[0]
        assert again.fits and again.estimate_gb == pytest.approx(row.fit_estimate_gb, abs=0.01)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3n", "gemma4_edge", "gemma4_moe"])
def test_shapes_from_the_config_equal_the_loaded_model(family, hf_model, tmp_path):
    """The lazy model built from config.json alone holds exactly the bytes of the real checkpoint, loaded
    and after convert --quantize 4 (same dtype, same mlx-lm quantization policy)."""
    from mlx_gemma_tune import memory, models, plan
    from mlx_gemma_tune.convert import convert

    _, config = plan.read_config(str(hf_model(family)))
    loaded, _ = models.load_model(hf_model(family))
    lazy, _ = plan._model(config, None, None, {})
    assert memory.model_bytes(lazy) == memory.model_bytes(loaded)
    convert(str(hf_model(family)), tmp_path / "q4", quantize=4)
    quantized, _ = models.load_model(tmp_path / "q4")
    lazy4, _ = plan._model(config, 4, None, {})
    assert memory.model_bytes(lazy4) == memory.model_bytes(quantized)


@pytest.mark.parametrize("model,published", [("google/gemma-3n-E2B-it", 4.46e9), ("google/gemma-4-26B-A4B-it", 25.2e9),
                                             ("google/gemma-4-31B-it", 30.7e9)])
def test_shipped_configs_match_the_published_sizes(model, published):
    """Text-model parameter counts from the shipped configs against the published totals (rounded to 3
    digits by their publishers: within 0.5%)."""
    from mlx_gemma_tune import plan

    _, config = plan.read_config(model)
    lazy, _ = plan._model(config, None, None, {})
    assert plan._size(lazy)[0] == pytest.approx(published, rel=5e-3)


def test_unknown_model_is_one_line_naming_the_shipped_configs(tmp_path):
    assert_one_line_error(run_cli(["doctor", "google/gemma-9-XL", "--plan"]), "google/gemma-9-XL",
                          "google/gemma-4-E4B-it")
    assert_one_line_error(run_cli(["doctor", "--plan"]), "--plan needs MODEL", code=2)
