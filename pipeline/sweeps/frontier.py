"""The sweep's memory-vs-perplexity frontier: each configuration a point at its total size and perplexity
(the logits' relative error against the unquantized reference when no job has a perplexity: no tokenizer).

It answers "which settings should I use?": every quantization (quantization=auto at its budgets, int8 at its
thresholds, nf4, none) on the same axes. Points of one method are joined in order of size, since they differ
only in that method's own settings: the swept keys of the quantization and memory groups and the frontier
presets (pipeline/conf/frontier). Any other swept key (dtype, checkpoint, evaluation text) starts another
line. The evaluation text and the held-out text (stages.validate.metrics.heldout) are two panels, so a plan
chosen on the one is judged on the other; the unquantized model's perplexity is a dashed line. A failed job
has neither size nor perplexity: it is listed in red under the axes, never drawn.
"""

from __future__ import annotations

from pathlib import Path

POINT_GROUPS = ("quantization", "memory", "frontier")  # swept keys that move a configuration along the frontier
MARKERS = "osD^vP"
TEXTS = (  # (figure, its unquantized reference, panel title)
    ("perplexity", "reference_perplexity", "perplexity on the evaluation text"),
    ("heldout_perplexity", "reference_heldout_perplexity", "perplexity on the held-out text"),
)
LOGITS_ERROR = ("logits_rel_error", None, "logits' relative error vs the unquantized reference (no perplexity)")


def draw(rows: list[dict], swept: list[str], devices: list[str]):
    """(file stem, Figure) of the frontier, or None when fewer than two jobs have both a size and a quality figure."""
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and _mib(r, devices)]
    panels = [t for t in TEXTS if any(r.get(t[0]) is not None for r in ok)] or [LOGITS_ERROR]
    sized = [r for r in ok if r.get(panels[0][0]) is not None]
    if len(sized) < 2:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    points = [k for k in swept if k.split(".")[0] in POINT_GROUPS]
    for ax, (metric, reference, title) in zip(axes[0], panels, strict=True):
        _panel(ax, sized, devices, points, [k for k in swept if k not in points], metric, reference)
        ax.set_title(title)
        ax.set_ylabel(metric)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        said = "; ".join(f"{_label(r, points or swept)}: {str(r.get('error') or r.get('status'))[:70]}" for r in failed)
        fig.text(0.01, 0.01, f"failed ({len(failed)}, not drawn): {said}", color="red", fontsize=7, wrap=True)
    fig.suptitle("memory vs perplexity, every configuration of the sweep")
    fig.tight_layout(rect=(0, 0.06 if failed else 0, 1, 1))
    return "frontier", fig


def _panel(ax, rows, devices, points, others, metric, reference) -> None:
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get(metric) is not None:  # an unquantized model's logits error is a real 0
            lines.setdefault((r.get("method"), *(r["_swept"].get(k) for k in others)), []).append(r)
    for i, ((method, *rest), members) in enumerate(lines.items()):
        members.sort(key=lambda r: _mib(r, devices))
        xs, ys = [_mib(r, devices) for r in members], [r[metric] for r in members]
        name = ", ".join([str(method)] + [f"{k}={short(v)}" for k, v in zip(others, rest, strict=True)])
        ax.plot(xs, ys, "-" + MARKERS[i % len(MARKERS)], mfc="none", ms=8, label=name)  # hollow: equal points show
        for x, y, r in zip(xs, ys, members, strict=True):
            ax.annotate(_label(r, points), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    for value in sorted({round(r[reference], 4) for r in rows if reference and r.get(reference)}):
        ax.axhline(value, ls="--", color="grey", lw=1, label=f"unquantized reference {value:.3f}")
    ax.set_xlabel("MiB, all devices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _mib(row: dict, devices: list[str]) -> float:
    return sum(row.get(d) or 0 for d in devices) / 2**20


def short(value) -> str:
    """A path's last part (checkpoints, evaluation texts): legends stay readable."""
    text = str(value)
    return Path(text).name or text if "/" in text else text


def _label(row: dict, keys: list[str]) -> str:
    """The point's own settings, as the sweep set them (a preset's name, a budget, a threshold)."""
    return ", ".join(short(row["_swept"].get(k, "")) for k in keys) or row.get("job", "")
