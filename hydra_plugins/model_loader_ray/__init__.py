"""A Hydra launcher that runs each sweep job as a Ray task (`hydra/launcher=ray`).

Ours rather than hydra-ray-launcher: that package pins cloudpickle<3 (joblib 1.5+, which
the joblib launcher needs, requires cloudpickle>=3) and pulls ray[default] plus boto3 for
its AWS launcher. This one needs plain `ray` and only Hydra's public Launcher API; see
docs/design.md (Launchers) and docs/sweeps.md.
"""
