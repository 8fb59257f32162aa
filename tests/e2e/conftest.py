"""End-to-end tests: real servers and the real daemon.

Everything here talks to a real mosquitto broker with mutual TLS (the AWS IoT emulator and
the test PKI of `gatewayd.emulators`), and most run the real `ota-gatewayd` as a process
against emulated devices on pseudo-terminals (`lab`). The fast, in-process tests are in
`tests/unit/`.
"""

from __future__ import annotations

import pytest

from gatewayd.emulators.lab import Lab


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cloud_may_refuse(*codes, why): AWS IoT may refuse the daemon's updates with these "
        "rejection codes in this test, for the reason given")


@pytest.fixture
def lab(tmp_path, request):
    """A Lab (broker, AWS IoT emulator, devices, daemon) that is torn down after the test.

    After the test, every job execution update the daemon sent must have been accepted by
    AWS IoT (statusDetails limits, expectedVersion, legal transitions); a test whose story
    makes AWS refuse one (a job cancelled under the daemon's feet) says which codes and why
    with `@pytest.mark.cloud_may_refuse`."""
    marker = request.node.get_closest_marker("cloud_may_refuse")
    allowed = set(marker.args) if marker else set()
    if marker is not None and not marker.kwargs.get("why"):
        raise ValueError("cloud_may_refuse needs why=: the reason AWS IoT may refuse an update here")
    with Lab(tmp_path / "lab") as lab:
        yield lab
        refused = [(ex.thing, ex.job_id, code, update) for ex in lab.aws.executions()
                   for code, update in ex.rejections if code not in allowed]
        assert refused == [], f"AWS IoT refused updates the daemon sent: {refused}"
