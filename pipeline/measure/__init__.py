"""Measuring a loaded model: memory per device, the validate checks, quality metrics, the streamed reference."""
