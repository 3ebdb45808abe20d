"""Triton kernels for paged KV data movement (installed as `kvmem.kernels`).

Empty until the kernels land; the package exists so the installed layout is fixed from the start.
"""
