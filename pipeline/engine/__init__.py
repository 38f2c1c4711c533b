"""The engine: binds the configured stages (allow-list first), runs them over one LoadContext,
writes report.json and the stages' artifacts, and reuses a loaded model across sweep jobs."""
