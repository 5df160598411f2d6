"""The CAMERA checkpoint format: the one spec that the compressor and the server share.

* :mod:`.names` - config keys, quant_method, tensor-name templates
* :mod:`.schema` - the ``quantization_config`` model (versioned, validated)
* :mod:`.layout` - slab tensor shapes and dtypes
* :mod:`.safetensors_header` - a safetensors file's header, read without its tensors
* :mod:`.validate` - check a checkpoint directory against all of the above
* :mod:`.summary` - the one summary of a checkpoint (``inspect``, ``/camera/stats``)
* :mod:`.inspect` - ``camera-vllm inspect``: the summary plus the directory's files
* :mod:`.sharding` - how tensor-parallel ranks split experts and slabs

Importing any of these does not import torch, vLLM or the compressor (the shape
arithmetic comes from the torch-free :mod:`camera_kernels.geometry`);
``tests/unit/test_rooms.py`` holds it so.
"""

from .names import FORMAT_VERSION, QUANT_METHOD
from .schema import CameraFormatError, CameraQuantConfig, LayerSpec

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "CameraFormatError", "CameraQuantConfig", "LayerSpec"]
