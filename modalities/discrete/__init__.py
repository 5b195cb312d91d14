"""Masked discrete diffusion: masked-LM samplers (text, shapes palette tokens) and the arithmetic toy task."""
