"""Bridges between OpenDiT and other libraries (diffusers pipelines, tokenizers)."""
