"""The gateway's vocabulary, typed: every word it stores, shows or sends has one name here.

Three ideas, three names:
- a *phase* is where one stored thing is in its own life: a job (`jobs.phase`), a file
  (`files.phase`) or a transfer to one device (`transfers.phase`);
- a *word* is design.md's status word, what users and AWS IoT see (`phase` in statusDetails
  and in `status --json`): a job's phase is a word, a transfer's phase has one (`rebooting`
  shows as `testing`);
- a *status* is AWS IoT's job execution status (`IN_PROGRESS`, `SUCCEEDED`, ...).

The values are the strings stored in SQLite and sent on the wire, unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class Word(StrEnum):
    """design.md's status words, in the order a job goes through them."""

    IDLE = "idle"  # a device with no transfer yet (status rows only)
    UNREACHABLE = "unreachable"  # a device with no transfer under way that cannot be reached now (status rows only)
    QUEUED = "queued"
    RECEIVING = "receiving"  # a local update whose image is still arriving from ota-gatewayctl
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    WAITING = "waiting"
    UPLOADING = "uploading"
    TESTING = "testing"
    CONFIRMING = "confirming"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_WORDS


FINAL_WORDS = frozenset({Word.SUCCEEDED, Word.FAILED, Word.REJECTED, Word.CANCELLED})
# the words of a device at work; a job's word is the first of them any of its devices is in
ACTIVE_WORDS = (Word.UPLOADING, Word.TESTING, Word.CONFIRMING, Word.WAITING)
# a job's own phases before its devices take over its word
JOB_PREPARING = frozenset({Word.QUEUED, Word.DOWNLOADING, Word.VERIFYING})


class TransferPhase(StrEnum):
    """Where one image's transfer to one device is (the relay's phase machine)."""

    QUEUED = "queued"
    WAITING = "waiting"
    UPLOADING = "uploading"
    TESTING = "testing"  # the test mark is being set
    REBOOTING = "rebooting"  # test mark set, reset sent: the device should come back on the image
    CONFIRMING = "confirming"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def word(self) -> Word:
        return Word.TESTING if self is TransferPhase.REBOOTING else Word(self.value)

    @property
    def final(self) -> bool:
        return self.word.final

    @property
    def before_upload_done(self) -> bool:
        return self in (TransferPhase.QUEUED, TransferPhase.WAITING, TransferPhase.UPLOADING)

    @property
    def after_test_boot(self) -> bool:
        return self in (TransferPhase.REBOOTING, TransferPhase.CONFIRMING)


class FilePhase(StrEnum):
    """Where one file of a job is on its way to images/."""

    RECEIVING = "receiving"  # a pushed image arriving over the control socket
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VERIFIED = "verified"  # in images/<sha256>
    FAILED = "failed"


class JobKind(StrEnum):
    GATEWAY = "gateway"  # a job of the gateway's own thing: files go to devices by glob
    PROXIED = "proxied"  # a job of a device's own thing
    LOCAL = "local"  # `ota-gatewayctl push`: no AWS IoT job at all
    REDELIVER = "redeliver"  # the inventory puts a device's last image back (a swap, a reset): local too


class CloudStatus(StrEnum):
    """AWS IoT job execution statuses."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    REMOVED = "REMOVED"
    CANCELED = "CANCELED"
