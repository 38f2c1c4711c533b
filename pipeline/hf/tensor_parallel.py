"""The model's own tensor-parallel plan, as transformers carries it, and which dim of each tensor a style shards.

We read the plan through transformers (`model.tp_plan`, expanded to concrete names by the model's own
`_expand_parallel_plan`) rather than keeping a table per architecture. The dims below are the placements
transformers' styles give (ColwiseParallel: Shard(ndim-2), bias Shard(0); RowwiseParallel: Shard(-1), bias
replicated; EmbeddingParallel: its shard_dim; packed styles: the same dims per split_factor block). Styles
whose `shard_param` is transformers' no-op keep their parameters whole and only install their forward hooks;
hooks.py checks every placement against the styles themselves.

Checked on transformers 5.24.0 and 5.25.0 (older releases lack this API: `_check_transformers`).
5.25 took the MoE experts out of the tensor-parallel plans, so a Mixtral's experts are whole on every rank
there; a `base_model_tp_plan` in config.json that names the packed styles still shards them.
"""

from __future__ import annotations

from ..errors import UserError
from .version import unsupported

COLWISE = ("colwise", "colwise_gather_output", "colwise_rep")
ROWWISE = ("rowwise", "rowwise_rep", "rowwise_split_input")
EMBEDDING = {"embedding_rowwise": 0, "embedding_colwise": 1}
PACKED = ("packed_colwise", "packed_rowwise")
OLDEST_WITH_API = "5.24.0"  # transformers.distributed.tensor_parallel and _expand_parallel_plan as we use them
SHARDING = (*COLWISE, *ROWWISE, *EMBEDDING, *PACKED)


def _style(name: str):
    """A style from transformers' registry (`distributed.tensor_parallel.ALL_PARALLEL_STYLES`, 5.24 and 5.25)."""
    try:
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES
    except ImportError:
        raise unsupported("transformers.distributed.tensor_parallel") from None
    return ALL_PARALLEL_STYLES.get(name)


def style_placement(style: str, module, leaf: str, mesh):
    """The placement the style gives `module.<leaf>` (its `shard_param`, run on the parameter in place:
    pass a meta one); None when it leaves the parameter a plain tensor. 5.24 and 5.25."""
    _style(style).shard_param(module, leaf, mesh)
    placements = getattr(module._parameters[leaf], "placements", None)
    return placements[0] if placements else None


def install_style(model, module, style: str, mesh) -> None:
    """The style's forward hooks on `module`, with what transformers' apply_tensor_parallelism sets first
    (5.24 and 5.25): the text config for mla_kv_a_proj (it splits by the config's dims) and, on bitsandbytes
    layers, `_hf_quantized_needs_local_tp` (its local path for quantized weights)."""
    if style == "mla_kv_a_proj":
        module.config = model.config.get_text_config()
    if type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
        module._hf_quantized_needs_local_tp = True
    _style(style).install_forward(module, mesh)


def keeps_whole(style: str) -> bool:
    """A style that shards nothing (transformers' base no-op shard_param): parameters stay whole, hooks only."""
    from transformers.distributed.tensor_parallel import TensorParallelLayer

    found = _style(style)
    return found is not None and style not in SHARDING and type(found).shard_param is TensorParallelLayer.shard_param


def packing(style: str) -> int:
    """How many blocks of the sharded dim a style cuts alike (packed styles' split_factor; 1 otherwise)."""
    return int(getattr(_style(style), "split_factor", 1)) if style in PACKED else 1


def model_plan(model) -> dict[str, str]:
    """Concrete module and parameter names -> style, from the model's own plan; exit 2 when it has none."""
    _check_transformers(model)
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan or not hasattr(model, "_expand_parallel_plan"):
        raise UserError(
            f"parallel=tensor: {type(model).__name__} has no tensor-parallel plan (no config.base_model_tp_plan "
            "or _tp_plan in transformers); load it with parallel=none"
        )
    expanded = model._expand_parallel_plan(plan)
    unsupported = {name: style for name, style in expanded.items() if style not in SHARDING and not keeps_whole(style)}
    if unsupported:
        name, style = next(iter(unsupported.items()))
        raise UserError(
            f"parallel=tensor: {type(model).__name__} shards {name} with style {style!r}, which we do not load "
            f"yet (supported: {', '.join(SHARDING)} and the styles that keep parameters whole); "
            "load it with parallel=none"
        )
    return expanded


def _check_transformers(model) -> None:
    """The tensor-parallel API we build on (transformers 5.24); older releases lay it out otherwise."""
    import importlib.util

    from transformers import PreTrainedModel

    from .version import installed

    has_module = importlib.util.find_spec("transformers.distributed.tensor_parallel") is not None
    if not has_module or isinstance(model, PreTrainedModel) and not hasattr(model, "_expand_parallel_plan"):
        raise UserError(
            f"parallel=tensor: transformers {installed()} lacks the tensor-parallel API this "
            "loader uses (transformers.distributed.tensor_parallel, PreTrainedModel._expand_parallel_plan, "
            f"as in {OLDEST_WITH_API}); install transformers>={OLDEST_WITH_API} or load with parallel=none"
        )


def shard_dim(style: str, leaf: str, ndim: int) -> int | None:
    """The dim of parameter `leaf` (weight, bias) that `style` shards; None when it stays whole on every rank."""
    if style in COLWISE or style == "packed_colwise":
        return max(ndim - 2, 0)
    if style in ROWWISE or style == "packed_rowwise":
        return None if leaf == "bias" or ndim == 1 and style == "packed_rowwise" else ndim - 1
    return EMBEDDING.get(style)  # None: a style that keeps the parameter whole


def check_heads(model, plan: dict[str, str], world: int) -> None:
    """Attention heads must not be cut across ranks: world must divide the query and key/value head counts."""
    from transformers.distributed.tensor_parallel import get_kv_heads_per_rank

    config = getattr(model, "config", None)
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field, what in (("num_attention_heads", "attention"), ("num_key_value_heads", "key/value")):
        heads = getattr(text, field, None)
        if isinstance(heads, int) and get_kv_heads_per_rank(plan, heads, world) is None:
            raise UserError(
                f"parallel.world_size={world} does not divide the {heads} {what} heads of {type(model).__name__} "
                f"(config.json {field}); a head cannot be cut across ranks: use a world size that divides {heads}"
            )
