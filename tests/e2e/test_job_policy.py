"""Jobs the gateway has no policy for are REJECTED before anything is downloaded (issue 11).

Two files of one job for the same device would run into the device's one slot one after the
other (the job could end SUCCEEDED with only the last image there); a file type other than
firmware (aws-iot-ota.md §6 case 30) has no relay policy on this gateway.
"""

from __future__ import annotations


def test_two_files_of_a_gateway_job_for_one_device_are_rejected_naming_both(lab):
    lab.add_device("pump", files="pump-*.bin")
    lab.add_device("fan", files="fan-*.bin")
    lab.start()
    first, second = lab.make_image((2, 0, 0), seed="a"), lab.make_image((2, 1, 0), seed="b")
    doc = lab.ota_update_files("two-for-one", "gw-01", [("pump-2.0.0.bin", first), ("fan-1.0.0.bin", first),
                                                        ("pump-2.1.0.bin", second)])
    record = lab.wait("gw-01", "two-for-one")
    assert record.status == "REJECTED", record
    assert record.status_details["reason"] == (
        "files[0] (pump-2.0.0.bin) and files[2] (pump-2.1.0.bin) both go to device pump, which takes one image "
        "per job: send them in separate jobs")
    assert lab.aws.blocks_served(doc["afr_ota"]["streamname"]) == 0
    assert lab.device("pump").upload_requests == 0 and lab.device("fan").upload_requests == 0


def test_two_files_of_a_device_things_job_are_rejected(lab):
    lab.add_device("pump", thing_name="pump")
    lab.start()
    image = lab.make_image((2, 0, 0))
    lab.ota_update_files("two-files", "pump", [("a.bin", image), ("b.bin", image)])
    record = lab.wait("pump", "two-files")
    assert record.status == "REJECTED", record
    assert "files[0] (a.bin) and files[1] (b.bin) both go to device pump" in record.status_details["reason"]
    assert lab.device("pump").upload_requests == 0


def test_a_file_type_other_than_firmware_is_rejected_before_download(lab):
    lab.add_device("pump", thing_name="pump")
    lab.start()
    image = lab.make_image((2, 0, 0))
    doc = lab.ota_update("config-file", "pump", image, filepath="settings.bin", file_type=2)
    record = lab.wait("pump", "config-file")
    assert record.status == "REJECTED", record
    assert record.status_details["reason"] == (
        "files[0] (settings.bin) has fileType 2: this gateway relays firmware images (fileType 0) only, and has "
        "no policy for other file types")
    assert lab.aws.blocks_served(doc["afr_ota"]["streamname"]) == 0
    assert lab.device("pump").upload_requests == 0
