"""Run every benchmark in turn and keep their JSON results in bench/results/.

    .venv/bin/python bench/run_all.py        # about 23 minutes on 2 cores
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def main() -> int:
    RESULTS.mkdir(exist_ok=True)
    runs = [
        ["wire.py"],
        ["uart_upload.py", "--json", str(RESULTS / "uart_upload.json")],
        ["stream_download.py", "--json", str(RESULTS / "stream_download.json")],
        ["ble_window.py", "--json", str(RESULTS / "ble_window.json")],
        ["wan_download.py", "--json", str(RESULTS / "wan_download.json")],
        ["cpu_per_mb.py", "--json", str(RESULTS / "cpu_per_mb.json")],
        ["scale.py", "--json", str(RESULTS / "scale.json")],
    ]
    failed = 0
    for script, *args in runs:
        print(f"\n=== {script} {' '.join(args)}", flush=True)
        failed |= subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH.parent).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
