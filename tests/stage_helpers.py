"""Stages used only by tests, admitted through the config's allow_targets (as a user would add theirs)."""

import resource


def interrupt(ctx):
    """Behaves like Ctrl-C arriving in the middle of a run."""
    raise KeyboardInterrupt


def limit_address_space(ctx, *, extra_mib: int = 1):
    """Caps this process's address space just above what it uses now: the next large allocation fails for real."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_mib * 2**20, resource.RLIM_INFINITY))
