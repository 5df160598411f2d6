"""camera_kernels: mixed-precision slab MoE kernels (torch reference and Triton).

Installed as ``camera_kernels`` (never as a top-level ``kernels``); imports only
torch and triton so it runs on machines without vLLM.
"""
