"""Sequence-parallel attention kernels, one file per strategy."""
