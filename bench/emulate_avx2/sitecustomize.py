"""Make vLLM load its AVX2 kernel library (``vllm._C_AVX2``), as it does on a CPU without AVX-512.

vLLM picks its CPU library from ``torch.cpu``'s ISA probes when it first loads its kernels
(``vllm/platforms/cpu.py``), in every process, its engine core included.  With this directory
on ``PYTHONPATH`` Python runs this file at start-up in each of them, so an AVX-512 machine
serves exactly as an AVX2-only one would (``bench/speed_cpu.py --isa avx2`` sets it up,
together with ``CAMERA_VLLM_CPU_ISA=avx2`` for the slab kernel's own build).
"""

import torch.cpu

torch.cpu._is_avx512_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False
torch.cpu._is_amx_tile_supported = lambda: False
