"""The CAMERA checkpoint format: the one spec that the compressor and the server share.

* :mod:`.names` - config keys, quant_method, tensor-name templates
* :mod:`.schema` - the ``quantization_config`` model (versioned, validated)
* :mod:`.layout` - slab tensor shapes and dtypes
* :mod:`.validate` - check a checkpoint directory against all of the above
* :mod:`.sharding` - how tensor-parallel ranks split experts and slabs
"""

from .names import FORMAT_VERSION, QUANT_METHOD
from .schema import CameraFormatError, CameraQuantConfig, LayerSpec

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "CameraFormatError", "CameraQuantConfig", "LayerSpec"]
