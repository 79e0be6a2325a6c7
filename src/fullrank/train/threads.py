"""CPU threads for a run: what the user asked for, or the cores that are free when it starts."""
from __future__ import annotations

import os

CPU_SAMPLE_SECONDS = 0.5


def free_cores(sample_seconds: float = CPU_SAMPLE_SECONDS) -> tuple[float, int]:
    """(cores left free by the work running now, cores this process may use): the machine's CPU use
    sampled over ``sample_seconds`` (not the load average, which a finished job leaves high for minutes)."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's (or launcher's) own limit
        usable = max(1, min(usable, int(os.environ["OMP_NUM_THREADS"])))
    total = psutil.cpu_count() or usable
    busy = psutil.cpu_percent(interval=sample_seconds) / 100.0 * total  # cores' worth of work, all processes
    return max(0.0, min(usable, total - busy)), usable


def choose_threads(requested: int, processes: int = 1) -> tuple[int, str]:
    """(CPU threads, why): ``requested``, or for 0 the cores free now, shared by this machine's
    ``processes`` (an oversubscribed core slows every step several times: a llama_tiny step took 9.6 s
    on 2 threads beside another 2-thread job, 1.9 s on 1), at least 1."""
    if requested:
        return requested, "--threads"
    free, usable = free_cores()
    threads = max(1, min(usable // processes, int(free / processes + 0.3)))
    return threads, (f"auto: {free:.1f} of {usable} cores free over {CPU_SAMPLE_SECONDS:g} s"
                     + (f", shared by {processes} processes" if processes > 1 else ""))
