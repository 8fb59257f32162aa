"""Errors that cross modules: a download that cannot complete, a job that must end."""

from __future__ import annotations

from .vocab import Word


class DownloadError(Exception):
    """A download (MQTT stream or HTTPS) cannot complete; `reason` is one readable sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobFailed(Exception):
    """The whole job ends (rejected or failed) with a reason a person can act on."""

    def __init__(self, word: Word, reason: str) -> None:
        super().__init__(reason)
        self.word = word
        self.reason = reason
