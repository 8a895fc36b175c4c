"""Stand-ins for transformers' lazy tensors, shared by the adapters."""

from __future__ import annotations

from fasthug_patch.errors import FastPathError
from fasthug_patch.plan import TensorRef
from fasthug_patch.thread_modes import as_made_here


class MappedSource:
    """A checkpoint tensor the engine will materialise. Answers the parts of safetensors'
    slice interface that loader code may call, so code we did not route to the engine
    still gets the right tensor (zero-copy, from our mapping)."""

    __slots__ = ("ref", "_engine")

    def __init__(self, ref: TensorRef, engine) -> None:
        self.ref = ref
        self._engine = engine

    def get_shape(self) -> list[int]:
        return list(self.ref.shape)

    def get_dtype(self) -> str:
        return self.ref.dtype_name

    def __getitem__(self, index):
        tensor = as_made_here(self._engine.submit(self.ref).result())  # as safetensors makes it here
        return tensor[index]

    def __repr__(self) -> str:
        return f"MappedSource({self.ref.name!r} in {self.ref.file})"


def check_bin_tensors(state_dict: dict) -> None:
    """A torch.load'ed state dict goes through the engine only if every value is a plain,
    contiguous CPU tensor (so a same-dtype result can be the very tensor stock keeps)."""
    import torch

    for name, tensor in state_dict.items():
        if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            raise FastPathError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise FastPathError(f"{name!r} is not a contiguous CPU tensor")
