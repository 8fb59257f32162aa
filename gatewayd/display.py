"""How `ota-gatewayctl` and the demo draw things on a terminal: tables, progress bars, sizes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TextIO

from .vocab import JobKind, Word

LOCAL_KINDS = (JobKind.LOCAL, JobKind.REDELIVER)  # no AWS IoT thing: shown by kind


def progress_bar(done: int | None, total: int | None, width: int = 20) -> str:
    """`[#########-----------]  45%`, or "" when there is nothing to measure."""
    if not total or done is None or total <= 0:
        return ""
    fraction = min(max(done / total, 0.0), 1.0)
    filled = int(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {int(fraction * 100):3d}%"


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def table(rows: Iterable[Iterable[Any]], header: Iterable[str] | None = None) -> list[str]:
    """Left-aligned columns separated by two spaces; columns empty in every row are left out."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    if not cells:
        return []
    width = max(len(row) for row in cells)
    keep = [i for i in range(width) if any(i < len(row) and row[i] for row in cells)]
    if header is not None:
        cells.insert(0, list(header))
    cells = [[row[i] if i < len(row) else "" for i in keep] for row in cells]
    widths = [max(len(row[i]) if i < len(row) else 0 for row in cells)
              for i in range(max(len(r) for r in cells))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def redraw(out: TextIO, lines: list[str], shown: int) -> int:
    """Replace the `shown` lines last drawn on a terminal with `lines`; returns their count."""
    if shown:
        out.write(f"\x1b[{shown}F\x1b[J")
    out.write("\n".join(lines) + "\n")
    out.flush()
    return len(lines)


def format_status(answer: dict[str, Any]) -> list[str]:
    connected = answer.get("connected")
    cause = answer.get("connection_error")
    lines = [f"AWS IoT: {'connected' if connected else 'not connected'}" + (f" ({cause})" if cause and not connected
                                                                              else "")]
    jobs = answer.get("jobs") or []
    lines.append("")
    if jobs:
        lines.append(f"Jobs ({len(jobs)}):")
        rows = []
        for job in jobs:
            done, total = job.get("done"), job.get("total")
            thing = job.get("thing") or (f"({job.get('kind')})" if job.get("kind") in LOCAL_KINDS else "")
            rows.append([job.get("job_id", "?"), thing, job.get("phase", ""),
                         progress_bar(done, total), job.get("reason", "")])
        lines += ["  " + line for line in table(rows, ["JOB", "THING", "PHASE", "PROGRESS",
                                                       "REASON"])]
    else:
        lines.append("Jobs: none")
    devices = answer.get("devices") or []
    lines.append("")
    if devices:
        lines.append(f"Devices ({len(devices)}):")
        rows = []
        for dev in devices:
            done, total = dev.get("done"), dev.get("total")
            amount = f"{human_bytes(done)}/{human_bytes(total)}" if total else ""
            rows.append([dev.get("name", "?"), dev.get("phase") or Word.IDLE,
                         progress_bar(done, total), amount, dev.get("version") or "",
                         dev.get("reason") or ""])
        lines += ["  " + line for line in table(rows, ["DEVICE", "PHASE", "PROGRESS", "BYTES",
                                                       "VERSION", "REASON"])]
    else:
        lines.append("Devices: none configured")
    return lines
