"""Import bitsandbytes once, quietly (its CPU backend warns about optional 4-bit kernels we do not use)."""
import logging


def import_bitsandbytes():
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # "inputs will be cast from bfloat16 to float16": inherent to LLM.int8, said once in the docs, not per layer
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes
