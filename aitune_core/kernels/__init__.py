"""Weight-only int8 and int4 matrix products that read the weights at the memory bandwidth on CPUs.

``quantize.py`` (the formats), ``cpu_weight_only.cpp`` (the kernels), ``build.py`` (compiled for the CPU
that runs them, cached), ``ops.py`` (torch custom ops, with a torch fallback), ``layers.py`` (the Linear
layers that use them, and the swap that puts them in a module).
"""
