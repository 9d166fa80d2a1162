"""Process memory readings shared by the memory benchmarks (Linux ``/proc``)."""

from __future__ import annotations

from pathlib import Path


def proc_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
