"""The CI hypothesis profile makes property tests a pure function of the checkout: the env
variable selects it, and under it a property draws the same examples on every run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

CONFTEST = Path(__file__).with_name("conftest.py")


def _draws(profile: settings) -> list[tuple[int, float]]:
    seen: list[tuple[int, float]] = []

    @settings(profile, max_examples=30)
    @given(st.integers(), st.floats(allow_nan=False))
    def prop(i: int, x: float) -> None:
        seen.append((i, x))

    prop()
    return seen


def test_ci_profile_settings():
    ci = settings.get_profile("ci")
    assert ci.derandomize is True
    assert ci.database is None
    assert ci.print_blob is True
    assert ci.deadline is None


def test_ci_profile_draws_the_same_examples_every_run():
    ci = settings.get_profile("ci")
    first, second = _draws(ci), _draws(ci)
    assert len(first) == 30
    assert first == second


def test_default_profile_draws_differ_between_runs():
    # The control for the test above: without derandomize, two runs of 30 draws from this
    # space coincide with negligible probability, so the equality above is not vacuous.
    randomised = settings(settings.get_profile("ci"), derandomize=False)
    assert _draws(randomised) != _draws(randomised)


def _profile_in_subprocess(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_PROFILE"}
    if value is not None:
        env["HYPOTHESIS_PROFILE"] = value
    code = (
        f"import runpy; runpy.run_path({str(CONFTEST)!r})\n"
        "from hypothesis import settings\n"
        "print(settings.default.derandomize, settings.default.database is None)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_env_variable_selects_the_profile():
    ci = _profile_in_subprocess("ci")
    assert ci.returncode == 0, ci.stderr
    assert ci.stdout.split() == ["True", "True"]
    default = _profile_in_subprocess(None)
    assert default.returncode == 0, default.stderr
    assert default.stdout.split() == ["False", "False"]


def test_unknown_profile_is_refused_by_name():
    bad = _profile_in_subprocess("nosuchprofile")
    assert bad.returncode != 0
    assert "nosuchprofile" in bad.stderr
