"""How many threads torch should use on a CPU that other processes share (issue 15, part 4).

torch starts one OpenMP thread per core, and its threads meet at a barrier after every parallel region: when another
process keeps one of two cores busy, every region waits for the thread that was descheduled, and a training step of
the demo takes 3.3x its idle time (2.6x with `OMP_WAIT_POLICY=PASSIVE`). With one thread fewer than the busy cores
take, it takes 1.7x. So the cores other processes keep busy are measured at start-up, over a fraction of a second of
`/proc/stat`, and torch gets the cores left over (never more than its default, at least one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROBE_SECONDS = 0.25  # long enough to see a busy core, short enough not to delay a run


def _cpu_ticks(cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of `cpus` since boot, from /proc/stat's `cpuN` lines."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(seconds: float = PROBE_SECONDS) -> float:
    """How many of this process's cores (`sched_getaffinity`) other processes keep busy, measured over `seconds`."""
    cpus = os.sched_getaffinity(0)
    busy_before, total_before = _cpu_ticks(cpus)
    own_before = time.process_time()
    time.sleep(seconds)
    busy_after, total_after = _cpu_ticks(cpus)
    own = (time.process_time() - own_before) / seconds  # our own threads' share, which is not contention
    elapsed = max(total_after - total_before, 1)
    return max(0.0, (busy_after - busy_before) / elapsed * len(cpus) - own)


def choose_torch_threads() -> tuple[int, str]:
    """The thread count for torch on this CPU now, and why (for the log): the cores others leave idle, rounded, at
    least 1 and at most torch's default. Where /proc/stat cannot be read (not Linux), torch's default."""
    default = torch.get_num_threads()
    try:
        busy = busy_cores()
    except (OSError, AttributeError) as error:  # no /proc/stat, or no sched_getaffinity
        return default, f"torch's default: cannot measure other processes' load ({error})"
    cores = len(os.sched_getaffinity(0))
    threads = max(1, min(default, round(cores - busy)))
    return threads, f"{cores} cores, {busy:.1f} kept busy by other processes (over {PROBE_SECONDS} s of /proc/stat)"
