"""Weights on disk: every checkpoint layout and its key map (checkpoints.py), weight-only int8 / int4
quantization at load (quantize.py), and the converter to the layout serving engines read (convert.py)."""
