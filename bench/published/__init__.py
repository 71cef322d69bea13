"""Published diffusion models read into the project's network, and ours written in the field's format.

Each source format has a module that reads its files as tensors only (``torch.load(weights_only=True)`` or
safetensors; nothing is unpickled) and returns a :class:`~bench.published.common.Converted`: the project U-Net's
config, the state dict under the project's names and the diffusion the model was trained with.
"""
