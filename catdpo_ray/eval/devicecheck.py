"""Catch a stray host tensor without owning a GPU: a *virtual accelerator* for CPU-only machines.

On a CPU every tensor lives on one device, so code that forgets to move a tensor (the bug class of
issue 9: the category mask and safety flags of ``catdpo-ray eval`` stayed on the host and the
preference evaluation crashed on every GPU) passes all CPU tests. :class:`VirtualAccelerator` is a
``torch.overrides.TorchFunctionMode`` that keeps the real storage on the CPU but tracks, per tensor,
whether the program *believes* it lives on an accelerator (default ``cuda:0``), and raises exactly
where CUDA would:

- ``t.to("cuda")``, ``t.cuda()``, ``module.to("cuda")`` and factories called with
  ``device="cuda"`` give tensors marked *on device*; ``t.cpu()`` / ``t.to("cpu")`` give host ones;
  ``t.device`` answers the virtual device for marked tensors (so ``model.device``,
  ``next(model.parameters()).device`` and everything derived from them follow the program's view);
- an op that mixes an on-device tensor with a host tensor of one or more dimensions raises
  ``RuntimeError("Expected all tensors to be on the same device ...")``, naming the op and the
  host tensor's shape (host 0-dim tensors are allowed, as CUDA treats them as scalars; indexing,
  ``copy_`` and item assignment may cross devices, as on CUDA);
- ``t.numpy()`` of an on-device tensor raises, as on CUDA.

Outputs of an op are on device iff one of its inputs is. The mode is a checking tool (used by
``tests/eval``), not a simulator of memory or speed. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_MARK = "_catdpo_on_virtual_device"
_DEVICE_GET = torch.Tensor.device.__get__
_IS_CUDA_GET = torch.Tensor.is_cuda.__get__
_DATA_GET = torch.Tensor.data.__get__
_DATA_SET = torch.Tensor.data.__set__
#: Ops that may legally take host and device tensors together on CUDA.
_CROSS_DEVICE_OK: tuple[Callable[..., Any], ...] = (
    torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_, torch.Tensor.__repr__,
    torch.Tensor.__format__, torch.Tensor.__len__, torch._has_compatible_shallow_copy_type,
)


class _Untracked(Exception):
    """Raised inside the mode for meta tensors, which are passed through unchecked."""


def on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` is marked as living on the virtual accelerator."""
    return bool(getattr(t, _MARK, False))


def _mark(t: Any, value: bool) -> None:
    if isinstance(t, torch.Tensor):
        try:
            setattr(t, _MARK, value)
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor types without __dict__
            pass


class VirtualAccelerator(TorchFunctionMode):
    """Track host vs. (virtual) accelerator placement of CPU tensors and fail on mixing.

    Args:
        device: the device the program under test is told to use, e.g. ``"cuda:0"``. Any device of
            this type counts as the accelerator; ``cpu`` is the host.

    Attributes:
        moved: number of tensors moved or created on the virtual device (a check that the program
            under test really used it).
        checked: number of ops whose tensor inputs were compared.

    Example::

        with VirtualAccelerator("cuda:0") as va:
            model.to("cuda:0")                       # parameters marked on device
            ids = batch["input_ids"].to(model.device)
            model(ids)                               # fine
            model(ids) * batch["mask"]               # RuntimeError: host tensor [B, T] meets device
    """

    def __init__(self, device: str | torch.device = "cuda:0") -> None:
        super().__init__()
        self.device = torch.device(device)
        if self.device.type == "cpu":
            raise ValueError("VirtualAccelerator: the virtual device must not be the host (cpu)")
        self.moved = 0
        self.checked = 0

    # --- placement -------------------------------------------------------------------------
    def _target(self, device: Any) -> bool | None:
        """True: the accelerator; False: the host; None: no device given.

        Raises:
            _Untracked: ``meta`` (transformers builds models there before loading weights): not tracked.
        """
        if device is None:
            return None
        d = torch.device(device) if not isinstance(device, torch.device) else device
        if d.type == "cpu":
            return False
        if d.type == self.device.type:
            return True
        if d.type == "meta":
            raise _Untracked
        raise RuntimeError(f"VirtualAccelerator({self.device}): unexpected device {d}")

    def _placed(self, src: torch.Tensor, out: torch.Tensor, target: bool) -> torch.Tensor:
        # ``x.to("cpu")`` on a host tensor returns ``x`` itself; a *different* placement needs a
        # distinct tensor object, or the source would silently change placement as well.
        if out is src and on_device(src) != target:
            out = src.view_as(src)
        _mark(out, target)
        self.moved += int(target)
        return out

    def _to(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        src = args[0]
        rest = args[1:]
        copy = bool(kwargs.pop("copy", False))
        if rest and isinstance(rest[0], torch.Tensor):  # t.to(other): other's device and dtype
            other = rest[0]
            target: bool | None = on_device(other)
            dtype = other.dtype
            non_blocking = bool(rest[1]) if len(rest) > 1 else kwargs.get("non_blocking", False)
            memory_format = None
        else:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
            target = self._target(device)
        call: dict[str, Any] = {"dtype": dtype, "non_blocking": non_blocking, "copy": copy}
        if memory_format is not None:
            call["memory_format"] = memory_format
        out = torch.Tensor.to(src, **call)
        return self._placed(src, out, on_device(src) if target is None else target)

    # --- the mode --------------------------------------------------------------------------
    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func == _DEVICE_GET:
            return self.device if on_device(args[0]) else func(*args)
        if func == _IS_CUDA_GET:
            return (self.device.type == "cuda") if on_device(args[0]) else func(*args)
        if func == _DATA_SET:  # Module._apply: param.data = param.to(device)
            func(*args)
            _mark(args[0], on_device(args[1]))
            return None
        if func == _DATA_GET:
            out = func(*args)
            _mark(out, on_device(args[0]))
            return out
        try:
            return self._dispatch(func, args, kwargs)
        except _Untracked:  # a meta-device tensor or target: shapes only, nothing to check
            return func(*args, **kwargs)

    def _dispatch(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if func is torch.Tensor.to:
            return self._to(args, dict(kwargs))
        if func is torch.Tensor.cuda:
            return self._placed(args[0], args[0], True)
        if func is torch.Tensor.cpu:
            return self._placed(args[0], args[0], False)
        if func is torch.Tensor.numpy and on_device(args[0]):
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. "
                            "Use Tensor.cpu() to copy the tensor to host memory first.")
        explicit = self._target(kwargs["device"]) if "device" in kwargs else None
        if explicit:
            kwargs = {**kwargs, "device": "cpu"}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            raise _Untracked
        device_in = any(on_device(t) for t in tensors)
        if device_in and func not in _CROSS_DEVICE_OK:
            self.checked += 1
            host = [t for t in tensors if not on_device(t) and t.dim() > 0]
            if host:
                name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two devices, {self.device} "
                    f"and cpu! (VirtualAccelerator: {name} got a host tensor of shape {tuple(host[0].shape)} "
                    f"and dtype {host[0].dtype} together with {self.device} tensors)")
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__:
            device_in = on_device(args[0])
        target = explicit if explicit is not None else device_in
        if target:
            for t in tree_flatten(out)[0]:
                _mark(t, True)
            self.moved += int(explicit is True)
        return out
