"""Triton kernels and bit packing for aqsearch (installed as ``aqsearch.kernels``)."""
