"""quantization=auto's allocation: each module keep, int8 or nf4, the smallest plan within a quality budget.

An additive model: a module's cost under a method is its share, by squared output error, of the
log-perplexity increase measured with every module under that method (measure/auto_plan.py measures
both), so the model reproduces all-int8 and all-nf4 exactly and interpolates between them. Greedy
on that model: start from every module at nf4 (the smallest), then, while the predicted increase is
over the budget, take the upgrade (nf4 -> int8 -> keep) that removes the most cost per byte it adds.
The plan's real (simulated) perplexity then confirms it; `upgrade` corrects a miss. Under memory caps the
same greedy order gives the best plan that fits (`best_fitting`).
"""

from __future__ import annotations

ORDER = ("nf4", "int8", "keep")  # smallest first: an upgrade moves one step right


def costs(errors: dict[str, dict[str, float]], totals: dict[str, float]) -> dict[str, dict[str, float]]:
    """module -> {method: predicted log-perplexity increase}; keep costs 0. `totals`: the increase measured with
    every module under each method (negative ones, noise, count as 0)."""
    out: dict[str, dict[str, float]] = {m: {"keep": 0.0} for m in errors}
    for method, total in totals.items():
        squares = {m: e[method] ** 2 for m, e in errors.items()}
        norm = sum(squares.values()) or 1.0
        for m, sq in squares.items():
            out[m][method] = max(total, 0.0) * sq / norm
    return out


def predicted(methods: dict[str, str], cost: dict[str, dict[str, float]]) -> float:
    return sum(cost[m][k] for m, k in methods.items())


def upgrade(methods: dict[str, str], cost, nbytes, target: float) -> dict[str, str]:
    """Move modules up (nf4 -> int8 -> keep), best cost removed per byte added first, until the predicted
    increase is at most `target` or nothing is left to move."""
    methods = dict(methods)
    if predicted(methods, cost) > target:
        for _ in _greedy(methods, cost, nbytes):
            if predicted(methods, cost) <= target:
                break
    return methods


def allocate(cost, nbytes, target: float) -> dict[str, str]:
    """The smallest plan (by greedy upgrades from all-nf4) whose predicted increase is within `target`."""
    return upgrade(dict.fromkeys(cost, ORDER[0]), cost, nbytes, target)


def best_fitting(cost, nbytes, fits) -> dict[str, str] | None:
    """The plan with the least predicted cost that `fits` (the memory caps) among the greedy's plans from all-nf4
    to all-keep, or None when not even all-nf4 fits. Each upgrade adds bytes, so the plans that fit are a prefix
    of that order: a binary search calls `fits` (a real plan against the caps) about log2(2 x modules) times."""
    start = dict.fromkeys(cost, ORDER[0])
    steps = list(_greedy(dict(start), cost, nbytes))

    def taken(k: int) -> dict[str, str]:
        return {**start, **dict(steps[:k])}  # a module upgraded twice: its later step wins

    if not fits(taken(0)):
        return None
    lo, hi = 0, len(steps)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(taken(mid)) else (lo, mid - 1)
    return taken(lo)


def _greedy(methods: dict[str, str], cost, nbytes):
    """Upgrade `methods` in place one module at a time, most predicted cost removed per byte added first, until
    every module is kept; yields each step (module, new method) after taking it."""
    while True:
        best, best_gain = None, -1.0
        for m, k in methods.items():
            if k == ORDER[-1]:
                continue
            up = ORDER[ORDER.index(k) + 1]
            gain = (cost[m][k] - cost[m][up]) / max(nbytes[m][up] - nbytes[m][k], 1)
            if gain > best_gain:
                best, best_gain = (m, up), gain
        if best is None:
            return
        methods[best[0]] = best[1]
        yield best


def total_bytes(methods: dict[str, str], nbytes) -> int:
    return sum(nbytes[m][k] for m, k in methods.items())
