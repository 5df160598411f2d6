"""Reading source (Hugging Face) checkpoints: the room the compressor and the server share.

* :mod:`.source` - :class:`~.source.SourceCheckpoint`, a model directory read tensor by
  tensor under checkpoint-form names (per-expert or fused experts, Mixtral's ``mlp``);
* :mod:`.keeps` - :class:`~.keeps.LayerKeep` (the micro-experts a layer keeps) and the
  CAMERA-P ``quantization_config`` that keep sets describe;
* :mod:`.zero_mask` - which micro-experts a zero-masked model (the CAMERA reference
  code's output) keeps.

``camera_vllm.compress`` and ``camera_vllm.vllm_plugin`` both import this package; it
imports neither of them, nor vLLM (``tests/unit/test_rooms.py`` holds it so).  Importing
the package itself loads nothing: import the submodule you need.
"""
