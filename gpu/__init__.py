"""Worker side: model repository, tensor codec, torch runtime, device memory probes.

``gpu.repository`` and ``gpu.tensors`` import no torch, so the gateway can read the
repository and validate tensors without paying for it.
"""
