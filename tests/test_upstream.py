"""The library internals we touch are listed in one place (upstream.py), resolve on the verified
versions, are pinned by pyproject.toml, and a version mismatch is one warning line."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import tomllib

from helpers import assert_one_line_error, run_cli

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def test_pyproject_pins_the_verified_versions_and_they_are_installed():
    from packaging.requirements import Requirement

    from mlx_gemma_tune import upstream

    pins = {}
    for dep in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        if req.marker is None or req.marker.evaluate():
            pins[req.name] = req.specifier
    for package, verified in upstream.VERIFIED.items():
        assert verified in pins[package], (package, verified, pins[package])
        assert upstream.installed(package) is not None
    assert str(pins["mlx-lm"]) == f"=={upstream.VERIFIED['mlx-lm']}"  # its code is overridden: one release
    assert upstream.mismatches() == []


def test_every_contact_point_resolves_and_a_missing_one_is_one_line():
    from mlx_gemma_tune import models, upstream

    for package, contact, what, where in upstream.CONTACTS:
        assert package in upstream.VERIFIED and what and where
        assert upstream.resolve(contact) is not None, contact
    # every method models.py overrides is a listed contact point
    listed = {c.replace(":", ".") for _p, c, _w, _h in upstream.CONTACTS}
    assert set(models.OVERRIDDEN_SOURCE_SHA256) <= listed
    with pytest.raises(upstream.UserError) as err:
        upstream.resolve("mlx_lm.utils:_renamed_upstream")
    line = err.value.one_line()
    assert "mlx-lm 0.32.2 has no mlx_lm.utils._renamed_upstream" in line and "mlx-lm==0.32.2" in line


def test_another_version_installed_is_one_warning_line_on_load(hf_model, monkeypatch):
    from mlx_gemma_tune import models, upstream

    real = upstream.installed
    monkeypatch.setattr(upstream, "installed", lambda p: "0.33.0" if p == "mlx-lm" else real(p))
    want = ("mlx-lm 0.33.0 is installed; mlx-gemma-tune's fixes and checks were verified on mlx-lm 0.32.2, so some "
            "may not apply (pip install 'mlx-lm==0.32.2')")
    assert upstream.mismatches() == [want]
    upstream.warn_on_load.cache_clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        models.load_model(hf_model("gemma3_text"))
    assert [str(w.message) for w in seen if w.category is upstream.UpstreamWarning] == upstream.mismatches()
    upstream.warn_on_load.cache_clear()
    res = run_cli(["generate", hf_model("gemma3_text"), "--prompt", "Hi", "--max-tokens", "2", "--temp", "0"])
    assert res.exit_code == 0, res.output
    warned = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    assert warned == ["warning: " + upstream.mismatches()[0]]
    upstream.warn_on_load.cache_clear()
    doctor = run_cli(["doctor", "--json"])
    assert upstream.mismatches()[0] in doctor.stdout
    assert_one_line_error(run_cli(["generate", hf_model("gemma3_text"), "--prompt", "Hi", "--tools", "none.json"]),
                          "none.json")  # an error stays one line with the warning machinery installed
