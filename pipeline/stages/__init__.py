"""The stages, thin: each reads the LoadContext, calls the package that does the work, adds its report section.

instantiate_empty -> plan -> quantize -> load_shards -> validate (-> save). Each is a plain
function `stage(ctx, **yaml_keys)` configured from pipeline/conf/stages/<name>.yaml; `_target_`s
in user configs name them as pipeline.stages.<name>.<name>.
"""
