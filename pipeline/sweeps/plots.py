"""The sweep's plots: load time, memory and quality against each swept key, and the memory-vs-perplexity
frontier of every configuration (sweeps/frontier.py).

A line joins only jobs that differ in that key alone: jobs are grouped by the values of every
other swept key, one line (and legend entry) per group, so a threshold plot over two memory maps
is two lines, never one zig-zag between them. A failed job has no value to draw: it is a red x
at the bottom edge of the axes, labelled "failed", never a point at 0. Quality is perplexity
(loaded and unquantized reference) when jobs measured it, and the logits' relative error against
the reference when they did (a checkpoint without a tokenizer has only that); a swept evaluation
text is one more key, so each text is its own line.
"""

from __future__ import annotations

from pathlib import Path

from . import frontier

FAILED_Y = 0.03  # where a failed job's x sits: in axes coordinates, just above the bottom edge


def plot(root: Path, rows: list[dict], swept: list[str], devices: list[str]) -> list[Path]:
    """Write every plot as <name>.png under `root`; ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, fig in draw(rows, swept, devices):
        path = root / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def draw(rows: list[dict], swept: list[str], devices: list[str]) -> list[tuple[str, object]]:
    """(file stem, matplotlib Figure) for every plot of these rows."""
    import matplotlib.pyplot as plt

    out = [made] if (made := frontier.draw(rows, swept, devices)) else []
    for key in swept:
        axis = _Axis(rows, key)
        groups = _groups(rows, key, swept)
        stem = key.replace(".", "_").replace("/", "_")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        _lines(axes[0], axis, groups, lambda r: r.get("load_seconds"), "")
        axes[0].set_ylabel("load_shards seconds")
        for dev in devices:
            name = dev.removeprefix("bytes_")
            _lines(axes[1], axis, groups, lambda r, d=dev: r[d] / 2**20 if r.get(d) else None, name)
        axes[1].set_ylabel("MiB per device")
        _finish(fig, axes, axis, f"load time and memory vs {key}")
        out.append((f"load_and_memory_vs_{stem}", fig))
        for metric, ref, ylabel, title in _quality(rows):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            _lines(ax, axis, groups, lambda r, m=metric: r.get(m), "loaded" if ref else "")
            if ref:
                _lines(ax, axis, groups, lambda r, m=ref: r.get(m), "unquantized reference", style="--s")
            ax.set_ylabel(ylabel)
            _finish(fig, [ax], axis, f"{title} vs {key}")
            out.append((f"{'quality' if ref else 'logits_error'}_vs_{stem}", fig))
    return out


def _quality(rows: list[dict]) -> list[tuple]:
    """(metric, its reference or None, y label, title) for each quality measure some job has."""
    found = []
    if any(r.get("perplexity") is not None for r in rows):
        found.append(("perplexity", "reference_perplexity", "perplexity on the evaluation text", "quality"))
    if any(r.get("logits_rel_error") is not None for r in rows):
        found.append(("logits_rel_error", None, "logits' relative error vs the unquantized reference", "logits error"))
    return found


class _Axis:
    """The swept key's values as x positions (numbers as they are, anything else in order of appearance), with the
    rows they belong to."""

    def __init__(self, rows: list[dict], key: str):
        self.rows, self.key = rows, key
        self.labels = [str(r["_swept"].get(key, "")) for r in rows]
        try:
            self.x = [float(v) for v in self.labels]
            self.ticks = None
        except ValueError:
            names = list(dict.fromkeys(self.labels))
            self.x = [float(names.index(v)) for v in self.labels]
            self.ticks = [frontier.short(n) for n in names]


def _groups(rows: list[dict], key: str, swept: list[str]) -> dict[str, list[int]]:
    """Row indices per setting of the other swept keys (the legend label says which: '' when there is one)."""
    others = [k for k in swept if k != key]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        label = ", ".join(f"{k}={frontier.short(r['_swept'].get(k, ''))}" for k in others)
        groups.setdefault(label, []).append(i)
    return groups


def _lines(ax, axis: _Axis, groups: dict, value, what: str, style: str = "-o") -> None:
    """One line per group through its ok jobs that have a value, in x order; its failed jobs as edge marks."""
    rows = axis.rows
    for label, members in groups.items():
        pts = sorted((axis.x[i], value(rows[i])) for i in members if _ok(rows[i]) and value(rows[i]) is not None)
        name = ", ".join(p for p in (what, label) if p) or None
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    failed = sorted({axis.x[i] for members in groups.values() for i in members if not _ok(rows[i])})
    if failed and not any(line.get_gid() == "failed" for line in ax.get_lines()):
        ax.plot(failed, [FAILED_Y] * len(failed), "x", color="red", ms=9, mew=2, clip_on=False,
                transform=ax.get_xaxis_transform(), label="failed job (no value)", gid="failed")  # fmt: skip
        for x in failed:
            ax.annotate("failed", (x, FAILED_Y), xycoords=ax.get_xaxis_transform(), xytext=(0, 8),
                        textcoords="offset points", ha="center", fontsize=7, color="red")  # fmt: skip


def _ok(row: dict) -> bool:
    return row.get("status") == "ok"


def _finish(fig, axes, axis: _Axis, title: str) -> None:
    for ax in axes:
        ax.set_xlabel(axis.key)
        if axis.ticks is not None:
            ax.set_xticks(range(len(axis.ticks)), axis.ticks, rotation=20)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
