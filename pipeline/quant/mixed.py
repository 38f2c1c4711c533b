"""quantization=auto's allocation: each module keep, int8 or nf4, the smallest plan within a quality budget.

An additive model: a module's cost under a method is its share, by squared output error, of the
log-perplexity increase measured with every module under that method (measure/auto_plan.py measures
both), so the model reproduces all-int8 and all-nf4 exactly and interpolates between them. Greedy
on that model orders the plans from every module at nf4 (the smallest) to every module kept, one upgrade
(nf4 -> int8 -> keep) at a time, the most cost removed per byte added first (`Plans`). Along that order a
budget is searched by the plans' real (simulated) perplexity, caps by real plans (measure/auto_plan.py):
the model only orders the upgrades, the measurements decide.
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


class Plans:
    """The greedy's plans in order of size: plan 0 is every module nf4, each next one upgrades (nf4 -> int8 ->
    keep) the module whose upgrade removes the most predicted cost per byte it adds, the last keeps every module.
    Sizes grow along it and predicted costs fall, so the plans that fit memory caps are a prefix and the plans
    within a quality budget (roughly) a suffix: both searches are binary, over real plans and measured figures."""

    def __init__(self, cost, nbytes):
        self.start = dict.fromkeys(cost, ORDER[0])
        self.steps = list(_greedy(dict(self.start), cost, nbytes))

    def __len__(self) -> int:
        return len(self.steps) + 1

    def at(self, k: int) -> dict[str, str]:
        return {**self.start, **dict(self.steps[:k])}  # a module upgraded twice: its later step wins

    def last(self, fits) -> int | None:
        """The largest plan that `fits` (the caps), or None when not even plan 0 does: about log2(len) calls."""
        if not fits(self.at(0)):
            return None
        return self.first(lambda k: not fits(self.at(k)), 1, len(self)) - 1

    @staticmethod
    def first(passes, lo: int, hi: int, close=lambda lo, hi: False) -> int:
        """The smallest k in [lo, hi) with passes(k), by bisection, taking passes(hi) as true (hi when none is
        found; also when `close(lo, hi)` says the rest is not worth a call). Where passes is not monotone the
        answer still passes, with the plan before it failing or not tried."""
        while lo < hi and not close(lo, hi):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if passes(mid) else (mid + 1, hi)
        return hi


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
