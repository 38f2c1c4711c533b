"""Import bitsandbytes once, quietly (its CPU backend warns about optional 4-bit kernels we do not use)."""
import logging


def import_bitsandbytes():
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes
