"""statusDetails stay inside AWS's limits and follow design.md's keys."""

import re

from hypothesis import given, strategies as st

from gatewayd.report import status_details, summary
from gatewayd.views import DeviceStatus

KEY = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")


def _check_limits(details: dict[str, str]) -> None:
    assert len(details) <= 10
    for k, v in details.items():
        assert KEY.match(k), k
        assert isinstance(v, str) and 1 <= len(v) <= 1024, (k, len(v))
        assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in v), (k, v)


def test_proxied_thing_details():
    d = status_details(phase="uploading", progress=(512, 4096), device="pump", version="1.4.0")
    assert d == {"phase": "uploading", "progress": "512/4096", "device": "pump", "version": "1.4.0"}


def test_gateway_job_with_few_devices_has_one_key_each():
    devices = [DeviceStatus("a", "succeeded", "1.4.0"), DeviceStatus("b", "uploading", "45%"),
               DeviceStatus("c", "waiting")]
    d = status_details(phase="uploading", devices=devices)
    assert d["dev:a"] == "succeeded 1.4.0"
    assert d["dev:b"] == "uploading 45%"
    assert d["dev:c"] == "waiting"
    assert d["summary"] == "3 targets: 1 succeeded, 1 uploading, 1 waiting"
    _check_limits(d)


def test_many_devices_are_packed_and_every_name_appears():
    devices = [DeviceStatus(f"sensor-{i:02d}", "uploading", f"{i}%") for i in range(50)]
    d = status_details(phase="uploading", progress=(1, 2), devices=devices, reason="x" * 2000)
    _check_limits(d)
    packed = ";".join(v for k, v in d.items() if k.startswith("devs:"))
    for i in range(50):
        assert f"sensor-{i:02d}=uploading {i}%" in packed
    assert not any(k.startswith("dev:") for k in d)


def test_a_hundred_long_names_still_fit_and_say_how_many_are_missing():
    devices = [DeviceStatus("n" * 60 + f"{i:04d}", "failed", "reverted to 1.3.2") for i in range(100)]
    d = status_details(phase="failed", devices=devices, reason="r")
    _check_limits(d)
    assert re.search(r";\+\d+ more$", d["devs:6"])
    shown = sum(v.count("=") for k, v in d.items() if k.startswith("devs:"))
    missing = int(re.search(r"\+(\d+) more$", d["devs:6"]).group(1))
    assert shown + missing == 100


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
                          st.sampled_from(["waiting", "uploading", "failed", "succeeded"]),
                          st.text(max_size=300)), max_size=120),
       st.text(max_size=3000))
def test_any_device_set_stays_inside_the_limits(rows, reason):
    devices = [DeviceStatus(n, w, det) for n, w, det in rows]
    _check_limits(status_details(phase="uploading", progress=(1, 10), version="1.0.0", devices=devices,
                                 reason=reason or None))


def test_summary_counts():
    assert summary([DeviceStatus("a", "failed"), DeviceStatus("b", "failed")]) == "2 targets: 2 failed"
