"""Quantization: the typed spec, which layers, their exact sizes, bitsandbytes glue, pre-quantized checkpoints.

A new method is its name and fields in spec.py, its sizes in sizes.py, its modules and
weight quantization in bnb.py (or a module of its own), and one YAML in pipeline/conf/quantization/.
A checkpoint that is already quantized is read by formats/ (how it says so, where its stats
lie) and becomes the run's spec and layers in prequantized.py.
"""
