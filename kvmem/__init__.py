"""kvmem: elastic, shared KV-cache memory for LLM engines.

The device layer (`kvmem.device`) gives virtual reservations and physical pages on a GPU (CUDA
VMM) or in host RAM; the daemon `kvmemd` owns a GPU's pages and lends them to engine processes;
`kvctl` drives it.
"""

__version__ = "0.1.0"
