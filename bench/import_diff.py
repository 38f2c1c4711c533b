"""Two `python -X importtime` profiles side by side: seconds of import work per top-level package.

    python bench/import_diff.py imports_floor.txt imports_ours.txt

Self time per module is summed by top-level package (the first dotted name), so a package that
one run imports and the other does not, or one whose files were slower to read (a cold page
cache shared with a read-ahead), stands out. Sorted by how much more the second run spent.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path


def per_package(path: str) -> tuple[dict[str, float], int]:
    """Seconds of self time per top-level package, and the number of modules imported."""
    out: dict[str, float] = defaultdict(float)
    count = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        out[name.split(".")[0]] += int(self_us) / 1e6
        count += 1
    return out, count


def main() -> None:
    (a, na), (b, nb) = per_package(sys.argv[1]), per_package(sys.argv[2])
    print(f"modules: {na} vs {nb}; import seconds: {sum(a.values()):.2f} vs {sum(b.values()):.2f}")
    print(f"{'package':32} {'first s':>8} {'second s':>9} {'more s':>7}")
    for name in sorted(set(a) | set(b), key=lambda n: b.get(n, 0) - a.get(n, 0), reverse=True)[:40]:
        print(f"{name:32} {a.get(name, 0):8.2f} {b.get(name, 0):9.2f} {b.get(name, 0) - a.get(name, 0):7.2f}")


if __name__ == "__main__":
    main()
