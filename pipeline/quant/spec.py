"""Quantization settings as one frozen, validated object (`QuantSpec`), built once from the config.

The `quantization` config group is its only source: `QuantSpec.from_config` checks and
coerces every key once (numbers arrive as ints or strings from the command line), and
every other module reads the spec by attribute. A new method adds its name to METHODS,
its fields here, its sizes to quant/sizes.py and its bitsandbytes glue to quant/bnb.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..dtypes import POLICY_DTYPES
from ..errors import UserError
from ..names import matches
from ..schema import QuantizationSchema

_DEFAULT = QuantizationSchema()  # every default below is the schema's (pipeline/schema.py), written once there

METHODS = ("none", "int8", "nf4", "fp4", "auto")  # auto: per-module methods from a budget (measure/auto_plan.py)
FOUR_BIT = ("nf4", "fp4")
KEEP = "keep"  # a `methods` value: the module stays unquantized
MODULE_METHODS = ("int8", *FOUR_BIT, KEEP)
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
SKIP = "skip"
CPU_MATMULS = ("exact", "bitsandbytes")  # see quant/cpu_int8.py
CPU_NUMERICS = ("portable", "native")  # see quant/cpu_numerics.py
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch's name -> ours


@dataclass(frozen=True)
class QuantSpec:
    method: str = _DEFAULT.method
    threshold: float = _DEFAULT.threshold  # LLM.int8 outlier threshold (acts at forward time)
    skip_modules: tuple[str, ...] = ()
    overrides: tuple[tuple[str, float | str], ...] = ()  # (pattern, threshold or "skip"), first match wins
    offloaded: str = _DEFAULT.offloaded  # CPU-planned layers under a GPU: the method (quantize, run on CPU) or keep
    unquantized_dtype: str | None = (
        _DEFAULT.unquantized_dtype
    )  # dtype of what quantization leaves alone; None: the dtype policy
    compute_dtype: str = _DEFAULT.compute_dtype  # 4-bit: the dtype weights dequantize to
    double_quant: bool = _DEFAULT.double_quant
    blocksize: int = _DEFAULT.blocksize
    prequantized: bool = False  # the checkpoint holds quantized weights: loaded as saved, never re-quantized
    cpu_matmul: str = (
        _DEFAULT.cpu_matmul
    )  # int8 on the CPU: exact int32 on every CPU, or bitsandbytes' own kernel choice
    cpu_numerics: str = _DEFAULT.cpu_numerics  # int8 on the CPU: the same logits on every CPU, or torch's own kernels
    # per-module methods (pattern, int8 | nf4 | fp4 | keep), first match wins; the others take `method` (quant/mixed.py)
    methods: tuple[tuple[str, str], ...] = ()
    budget: float | None = None  # auto: the largest relative perplexity increase allowed (0.01: 1%)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def is_int8(self) -> bool:
        return self.method == "int8"

    @property
    def is_four_bit(self) -> bool:
        return self.method in FOUR_BIT

    @property
    def override_rules(self) -> dict[str, float | str]:
        return dict(self.overrides)

    def method_of(self, module: str) -> str:
        """The method of one module: the first `methods` pattern that matches it, else `method`."""
        return next((m for p, m in self.methods if matches(module, p)), self.method)

    def for_module(self, module: str) -> QuantSpec:
        """This spec with `module`'s own method: what sizes, builds and quantizes that one module."""
        method = self.method_of(module)
        return self if method == self.method and not self.methods else replace(self, method=method, methods=())

    def to_json(self) -> dict:
        """The settings that apply to this method (plan.json `inputs.quantization`)."""
        if not self.enabled:
            return {"method": "none"}
        out: dict = {"method": self.method}
        used = {self.method, *(m for _, m in self.methods)}
        if "int8" in used:
            out.update(threshold=self.threshold, cpu_matmul=self.cpu_matmul, cpu_numerics=self.cpu_numerics)
        if used & set(FOUR_BIT):
            out.update(compute_dtype=self.compute_dtype, double_quant=self.double_quant, blocksize=self.blocksize)
        if self.methods:
            out["methods"] = dict(self.methods)
        if self.budget is not None:
            out["budget"] = self.budget
        out.update(
            skip_modules=list(self.skip_modules),
            overrides=self.override_rules,
            offloaded=self.offloaded,
            unquantized_dtype=self.unquantized_dtype,
        )
        if self.prequantized:
            out["prequantized"] = True
        return out

    @classmethod
    def from_config(cls, node) -> QuantSpec:
        """Check and normalise the `quantization` node; UserError (exit 2) naming the key on a bad value."""
        node = dict(node or {})
        method = str(node.get("method", _DEFAULT.method)).lower()
        if method not in METHODS:
            raise UserError(f"quantization.method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method == "none":
            if node.get("methods"):
                raise UserError(
                    "quantization.methods: per-module methods need quantization=int8, nf4 or fp4 (the method "
                    "of the modules no pattern names); add quantization=int8 or drop quantization.methods"
                )
            return cls()
        kwargs: dict = {"method": method, "methods": _methods(node.get("methods"))}
        kwargs["budget"] = _budget(node.get("budget"), method)
        used = {method, *(m for _, m in kwargs["methods"])} | ({"int8", "nf4"} if method == "auto" else set())
        if "int8" in used:
            kwargs["threshold"] = _threshold(node.get("threshold", _DEFAULT.threshold), "quantization.threshold")
            kwargs["cpu_matmul"] = _choice(
                node.get("cpu_matmul", _DEFAULT.cpu_matmul), "quantization.cpu_matmul", CPU_MATMULS
            )
            kwargs["cpu_numerics"] = _cpu_numerics(
                node.get("cpu_numerics", _DEFAULT.cpu_numerics), kwargs["cpu_matmul"]
            )
        if used & set(FOUR_BIT):
            kwargs["compute_dtype"] = _dtype(
                node.get("compute_dtype", _DEFAULT.compute_dtype), "quantization.compute_dtype", allow_null=False
            )
            kwargs["double_quant"] = _bool(node.get("double_quant", _DEFAULT.double_quant), "quantization.double_quant")
            kwargs["blocksize"] = _blocksize(node.get("blocksize", _DEFAULT.blocksize))
        kwargs["skip_modules"] = _patterns(node.get("skip_modules"), "quantization.skip_modules")
        kwargs["overrides"] = tuple(_overrides(node.get("overrides"), method).items())
        offloaded = str(node.get("offloaded", method)).lower()
        if offloaded not in (method, "keep"):
            raise UserError(
                f"quantization.offloaded: {offloaded!r} is not valid with quantization={method}; "
                f"use {method} (quantize CPU-planned layers, run them on the CPU) or keep (leave them unquantized)"
            )
        kwargs["offloaded"] = offloaded
        kwargs["unquantized_dtype"] = _dtype(
            node.get("unquantized_dtype"), "quantization.unquantized_dtype", allow_null=True
        )
        return cls(**kwargs)


def _budget(raw, method: str) -> float | None:
    """`quantization.budget`: a relative perplexity increase, `1%` or 0.01 (quantization=auto without one takes the
    best plan within the memory caps: the plan stage checks that caps were given)."""
    if raw is None:
        return None
    if method != "auto":
        raise UserError(f"quantization.budget: {raw!r} is for quantization=auto; drop it or use quantization=auto")
    text = str(raw).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 10:  # also NaN
        raise UserError(f"quantization.budget: {raw!r} is not a perplexity increase; use e.g. quantization.budget=1%")
    return value


def _methods(node) -> tuple[tuple[str, str], ...]:
    """`quantization.methods`: module pattern -> int8, nf4, fp4 or keep (first match wins)."""
    if node is not None and not hasattr(node, "items"):
        raise UserError(
            f"quantization.methods: {node!r} is not a mapping; use e.g. quantization.methods={{down_proj: int8}}"
        )
    out = []
    for pattern, value in dict(node or {}).items():
        method = str(value).lower()
        if method not in MODULE_METHODS:
            raise UserError(f"quantization.methods.{pattern}: {value!r}; choose one of {', '.join(MODULE_METHODS)}")
        out.append((str(pattern), method))
    return tuple(out)


def _threshold(raw, key: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UserError(f"{key}: {raw!r} is not a number; use e.g. {key}=6.0") from None
    if value < 0 or value != value:
        raise UserError(f"{key}: {value:g} is negative; use 0 (no outlier path) or a positive value such as 6.0")
    return value


def _choice(raw, key: str, choices: tuple[str, ...]) -> str:
    value = str(raw).lower()
    if value not in choices:
        raise UserError(f"{key}: {raw!r}; choose one of {', '.join(choices)}")
    return value


def _cpu_numerics(raw, cpu_matmul: str) -> str:
    value = _choice(raw, "quantization.cpu_numerics", CPU_NUMERICS)
    if value == "portable" and cpu_matmul == "bitsandbytes":
        raise UserError(
            "quantization.cpu_numerics=portable needs exact int8 products, and quantization.cpu_matmul=bitsandbytes "
            "rounds them on CPUs without AVX-512; add quantization.cpu_numerics=native or drop cpu_matmul=bitsandbytes"
        )
    return value


def _patterns(raw, key: str) -> tuple[str, ...]:
    """A module-name pattern or a list of them (`5` or `[1, 2]` is no pattern: exit 2, not a crash later)."""
    items = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
        raise UserError(f"{key}: {raw!r} is not a list of module names; use e.g. {key}=[lm_head,down_proj]")
    return tuple(items)


def _overrides(node, method: str) -> dict:
    overrides: dict[str, float | str] = {}
    for pattern, value in dict(node or {}).items():
        if str(value).lower() == SKIP:
            overrides[str(pattern)] = SKIP
            continue
        if method != "int8":
            raise UserError(
                f"quantization.overrides.{pattern}: {value!r}; with quantization={method} an override "
                f"can only be skip (thresholds are LLM.int8's)"
            )
        try:
            t = float(value)
        except (TypeError, ValueError):
            t = -1.0
        if t < 0 or t != t:
            raise UserError(
                f"quantization.overrides.{pattern}: {value!r} is not a threshold; use a number >= 0 or skip"
            )
        overrides[str(pattern)] = t
    return overrides


def _dtype(raw, key: str, *, allow_null: bool):
    if raw is None or str(raw).lower() in ("null", "none", "auto"):
        if allow_null:
            return None
        raise UserError(f"{key}: give a dtype: one of fp32, fp16, bf16")
    name = str(raw).lower()
    if name not in POLICY_DTYPES:
        raise UserError(
            f"{key}: unknown dtype {raw!r}; choose one of fp32, fp16, bf16" + (" or null" if allow_null else "")
        )
    return DTYPE_NAMES.get(name, name)


def _bool(raw, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    raise UserError(f"{key}: {raw!r} is not true or false")


def _blocksize(raw) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if value not in BLOCKSIZES:
        raise UserError(f"quantization.blocksize: {raw!r}; choose one of {', '.join(map(str, BLOCKSIZES))}")
    return value
