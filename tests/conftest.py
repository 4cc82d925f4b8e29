"""Shared test fixtures, and the hypothesis profiles.

Hypothesis profiles: ``HYPOTHESIS_PROFILE=ci`` (exported by ``.ci/run``) selects ``ci``;
unset, the library's default profile (random examples, a local example database) applies.
The ``ci`` profile derives every example from the test's own source (``derandomize``) and
keeps no database, so a CI run is a pure function of the checkout. To reproduce a CI failure
locally, run the same command with the same profile, e.g.
``HYPOTHESIS_PROFILE=ci .venv/bin/python -m pytest -p no:cacheprovider tests/test_x.py::test_y``:
the same examples are generated in the same order. The failure report also prints a
``@reproduce_failure(...)`` blob (``print_blob``): pasting it above the test replays the
shrunk example under any profile.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    # No deadline: on 2 CPU cores shared by several jobs the time of one example depends on
    # the neighbours, and a timing failure would not reproduce locally, which is the point
    # of this profile. For the same reason the timing-based health check is off.
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
# An unknown name raises hypothesis' InvalidArgument naming it, before any test runs.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add overhead (and contention on shared CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
