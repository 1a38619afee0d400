"""Wall-clock timing with warm-up, synchronisation and a median/min/max/IQR summary."""

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> dict[str, float | int | list[float]]:
    """Median and spread of repeated timings (seconds); `all_s` keeps the run order."""
    if not seconds:
        raise ValueError("summarize() needs at least one timing.")
    ordered = sorted(seconds)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1], "q1_s": q1,
            "q3_s": q3, "repeats": len(ordered), "all_s": list(seconds)}


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of per-round ratios of two interleaved series: robust to load that drifts between rounds."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"paired_ratio needs two equal, non-empty series, got {len(numerators)} and "
                         f"{len(denominators)} values.")
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; returns `summarize` of the timed runs."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1.")
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return summarize(seconds)


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                        warmup: int = 1) -> dict[str, dict]:
    """Time several functions round-robin (A B C A B C ...), so load from other processes hits all alike."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1.")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in seconds.items()}
