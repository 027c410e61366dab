"""CPU kernels: weight-only int8 and int4 matrix products that read the weights at the memory bandwidth, and
attention over a decoder's static KV cache read where it lies.

``quantize.py`` (the formats), ``cpu_weight_only.cpp`` (the products), ``cpu_attention.cpp`` (the attention),
``cpu_ops.cpp`` (their registration as the ops' CPU implementation), ``build.py`` (built ahead for every
instruction-set level, shipped in archives; the build a CPU runs), ``ops.py`` (torch custom ops, with a torch
fallback), ``layers.py`` (the Linear layers that use them, and the swap that puts them in a module).
"""
