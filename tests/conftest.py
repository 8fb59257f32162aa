"""Shared fixtures: a test PKI and a real mosquitto broker with mutual TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.emulators.broker import Mosquitto, Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def broker_factory(tmp_path: Path, pki: Pki):
    """Start brokers with given ACL grants: `broker_factory({"gw-01": ["pump"]})`."""
    started: list[Mosquitto] = []

    def start(acts_for: dict[str, list[str]] | None = None) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker{len(started)}", pki, acts_for or {})
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory) -> Mosquitto:
    return broker_factory()
