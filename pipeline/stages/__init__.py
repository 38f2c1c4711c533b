"""The five stages, in the order the default config runs them.

instantiate_empty -> plan -> quantize -> load_shards -> validate. Each is a plain
function `stage(ctx, **yaml_keys)` configured from conf/stages/<name>.yaml.
"""
