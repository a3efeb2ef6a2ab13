"""The one timing helper the bench scripts share (they run as scripts: `python bench/bench_x.py`)."""
import time


def best_time(fn, repeats, warmup=1):
    """Seconds of the fastest of `repeats` calls after `warmup` untimed calls (the minimum is the least
    disturbed by other load on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
