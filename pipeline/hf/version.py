"""The transformers versions this loader is tested on, and the one message for a release that moved an API."""

from __future__ import annotations

from ..errors import UserError

OLDEST = "5.17.0"  # pyproject.toml's lower bound; scripts/compat.sh runs the suites on it
NEWEST_TESTED = "5.25.0"  # the lock (constraints.txt); a test keeps the two equal


def package_version(name: str) -> str | None:
    """An installed distribution's version, None when it is not installed (read from its metadata: no import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def installed() -> str:
    import transformers

    return transformers.__version__


def unsupported(what: str) -> UserError:
    """transformers lacks (or changed) `what`: name the installed version and the range that works."""
    return UserError(
        f"transformers {installed()}: {what} is missing or changed; this loader is tested on transformers "
        f"{OLDEST} to {NEWEST_TESTED}: pip install 'transformers=={NEWEST_TESTED}' (docs/compatibility.md)"
    )


def in_tested_range() -> bool:
    """The installed transformers lies within the range scripts/compat.sh tested."""
    from packaging.version import Version

    return Version(OLDEST) <= Version(installed()) <= Version(NEWEST_TESTED)


def untested_warning() -> str | None:
    """One line for the log when the installed transformers is outside the tested range; None inside it."""
    if in_tested_range():
        return None
    return (
        f"transformers {installed()} is outside the tested range {OLDEST} to {NEWEST_TESTED}; loads are still "
        "proven by validate, but a moved internal API ends in exit 2 (bash scripts/setup.sh installs the lock)"
    )
