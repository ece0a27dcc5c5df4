"""Counting live tensor bytes, on real tensors or on PyTorch's meta device.

`MemoryCounter` is a TorchDispatchMode: every tensor an op returns has its storage recorded once
(views and in-place results share the storage, so they are not counted twice) with a weak
reference whose callback subtracts the bytes when the storage is freed. `current` is the live
total, `peak` its maximum. Tensors that existed before the mode (weights, a trajectory) are
added with `register`. The same pattern as torch.distributed._tools.mem_tracker, without its
per-module bookkeeping.

On the meta device a tensor has no value: under the counter a scalar read of a meta tensor
(`bool(...)`, `.item()`) is 0 / False, and an op that allocates its outputs is run once per
signature (inputs' shapes, strides, dtypes and the other arguments): later calls make the same
outputs with `empty_strided` (`meta_call`; tests/test_bench.py holds it to the byte). Two more things differ from a GPU run, and
`MetaAutocast` puts them back:

- autocast does nothing without CUDA, so it is emulated as a TorchFunctionMode (above autograd,
  where real autocast sits): matmul/conv/linear/attention inputs are cast to the autocast dtype,
  norms and softmax run in float32, as CUDA autocast's op lists do;
- `scaled_dot_product_attention` would decompose into the math path (a B*H*N*N score matrix).
  A GPU runs flash or memory-efficient attention, which keep only the output and a float32
  logsumexp (B, H, N) for backward, and allocate dQ, dK, dV in backward; `EfficientAttention`
  allocates exactly those.

    with MemoryCounter() as counter, MetaAutocast(torch.float16):
        loss = model(x_meta).sum()
    loss.backward()   # inside the counter too
    counter.peak      # bytes
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

#: The CUDA caching allocator hands out multiples of 512 bytes.
CUDA_BLOCK = 512


class _Uncacheable(Exception):
    pass


#: Plain argument values an op's signature may hold (with their type: 1, 1.0 and True differ).
_PLAIN = (
    int,
    float,
    bool,
    str,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


def _key(value):
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or value.layout != torch.strided:
            raise _Uncacheable
        return (tuple(value.shape), value.stride(), value.storage_offset(), value.dtype)
    if isinstance(value, list | tuple):
        return (type(value), tuple(_key(v) for v in value))
    if isinstance(value, _PLAIN):
        return (type(value), value)
    raise _Uncacheable  # a generator, a scalar tensor's value, ...


@functools.cache
def _allocates_fresh(func) -> bool:
    """Whether `func`'s schema neither writes to an argument nor returns a view of one."""
    schema = func._schema
    return not any(a.alias_info is not None for a in (*schema.arguments, *schema.returns))


#: (op, the inputs' shapes / strides / dtypes and the other arguments) -> its outputs' specs,
#: or _RUN where the op must run (its outputs share a storage with its inputs or each other).
_META_OUTPUTS: dict[tuple, object] = {}
_RUN = object()


def meta_call(func, args, kwargs) -> tuple[object, bool]:
    """`func(*args, **kwargs)` and whether its outputs are fresh meta tensors (each with a
    storage of its own). An op on meta tensors that allocates its outputs (no view, no in-place
    write) runs once per signature: a meta tensor's shape, strides and dtype follow from the
    inputs' and the arguments alone, so later calls make the outputs with `empty_strided` (a
    meta kernel written in Python costs ~0.3-1.4 ms a call, and one training chunk of FLUX.1
    makes ~50,000 calls). Same outputs, so the same bytes counted."""
    if not _allocates_fresh(func):
        return func(*args, **kwargs), False
    try:
        key = (func, _key(args), _key(tuple(sorted(kwargs.items()))))
    except _Uncacheable:
        return func(*args, **kwargs), False
    spec = _META_OUTPUTS.get(key)
    if spec is _RUN:
        return func(*args, **kwargs), False
    if spec is not None:
        container, leaves = spec
        made = [None if leaf is None else _empty(*leaf) for leaf in leaves]
        return (made[0] if container is None else container(made)), True
    out = func(*args, **kwargs)
    _META_OUTPUTS[key] = _spec(out, inputs=_tensors((args, kwargs)))
    return out, _META_OUTPUTS[key] is not _RUN


def _empty(shape, stride, dtype) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _spec(out, inputs: list[torch.Tensor]):
    """(container, per output (shape, stride, dtype) or None) for outputs that are a meta
    tensor, or a tuple / list of them (and None), each with a storage of its own; else _RUN.
    (`_unsafe_view` returns its input's storage under a schema with no alias annotation.)"""
    container, leaves = (None, [out]) if isinstance(out, torch.Tensor) else (type(out), out)
    if container not in (None, tuple, list) or not leaves:
        return _RUN
    tensors = [t for t in leaves if t is not None]
    if not all(isinstance(t, torch.Tensor) and _is_meta(t) for t in tensors):
        return _RUN
    storages = {id(t.untyped_storage()) for t in tensors}
    if len(storages) < len(tensors) or storages & {id(t.untyped_storage()) for t in inputs}:
        return _RUN
    specs = [None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in leaves]
    return container, specs


def _tensors(value, found: list | None = None) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs (nested tuples, lists, dicts)."""
    found = [] if found is None else found
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, list | tuple):
        for item in value:
            _tensors(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, found)
    return found


def _is_meta(value: torch.Tensor) -> bool:
    return value.device.type == "meta" and value.layout == torch.strided


class MemoryCounter(TorchDispatchMode):
    """Live bytes of the storages of tensors created under it (and of those `register`ed).

    `device_type`: count only storages on that device type (None: every device).
    `round_to`: round each storage up to a multiple of this many bytes (512 mimics the CUDA
    caching allocator's smallest block; 1 counts exact bytes).
    `ignore_dtypes`: storages of these dtypes are not counted (the estimate ignores float8:
    only layerwise casting's cast back to its fp8 storage makes them, and that storage is the
    resident weight, counted once outside the counter).
    """

    def __init__(
        self, device_type: str | None = None, round_to: int = 1, ignore_dtypes: tuple = ()
    ):
        super().__init__()
        self.device_type = device_type
        self.round_to = round_to
        self.ignore_dtypes = tuple(ignore_dtypes)
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int, _ref) -> None:
        self.current -= nbytes

    def _add(self, tensor: torch.Tensor) -> None:
        if self.device_type is not None and tensor.device.type != self.device_type:
            return
        if tensor.layout != torch.strided or tensor.dtype in self.ignore_dtypes:
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        if self.round_to > 1:
            nbytes = math.ceil(nbytes / self.round_to) * self.round_to
        ref = weakref.ref(storage, lambda r, n=nbytes: self._free(n, r))
        self._seen[storage] = (nbytes, ref)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that already exist (weights, stored trajectories) while they live."""
        for tensor in tensors:
            self._add(tensor)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            # a meta tensor has no value: a data-dependent check (`bool((std <= 0).any())` in
            # the flow sampler) reads as 0 / False, the branch a real run takes
            return args[0].dtype.is_floating_point and 0.0 or 0
        out, fresh = meta_call(func, args, kwargs)
        if fresh:  # each output a storage of its own
            for tensor in _tensors(out):
                self._add(tensor)
            return out
        # a view or in-place result shares an input's storage: it allocated nothing (also when
        # the input predates the counter and was never registered, e.g. a weight's .t())
        inputs = {
            id(leaf.untyped_storage())
            for leaf in _tensors((args, kwargs))
            if leaf.layout == torch.strided
        }
        for leaf in _tensors(out):
            if leaf.layout == torch.strided and id(leaf.untyped_storage()) not in inputs:
                self._add(leaf)
        return out


class EfficientAttention(torch.autograd.Function):
    """Attention with the memory of a flash / memory-efficient kernel and no arithmetic.

    Forward allocates the output (B, H, N, Dv) and a float32 logsumexp (B, H, N), and saves
    q, k, v, output and logsumexp for backward. Backward allocates dQ, dK, dV and a float32
    (B, H, N) row buffer. No (B, H, N, M) matrix exists at any time. For meta tensors: the
    values are never computed.
    """

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty(
            (*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device
        )
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        delta = torch.empty_like(lse)  # rowsum(dO * O), as both kernels keep it
        grads = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        del delta
        return grads


def efficient_attention(query, key, value, attn_mask=None, *args, **kwargs):
    """`F.scaled_dot_product_attention`'s signature, `EfficientAttention`'s memory (the mask is
    an input that already exists; dropout, causality and scale change no allocation)."""
    return EfficientAttention.apply(query, key, value)


# CUDA autocast's op lists (torch/csrc/autograd/autocast_mode.cpp), the ops the models here call
_LOWER = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv_transpose2d,
    torch.conv2d,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.baddbmm,
    torch.addmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.bmm,
    torch.Tensor.baddbmm,
}
_FLOAT32 = {
    F.group_norm,
    F.layer_norm,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.group_norm,
    torch.layer_norm,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
}


def _cast(values, dtype):
    return [
        v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values
    ]


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast's casts, emulated where autocast cannot run (meta or CPU tensors), and
    scaled_dot_product_attention counted as the memory-efficient kernel.

    `dtype` None: no autocast (the model runs in its weights' dtype); attention is still
    replaced when `efficient_sdpa` is True.
    """

    _active: list[MetaAutocast] = []

    def __init__(self, dtype: torch.dtype | None = None, efficient_sdpa: bool = True):
        super().__init__()
        self.dtype = dtype
        self.efficient_sdpa = efficient_sdpa

    def __enter__(self):
        MetaAutocast._active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        MetaAutocast._active.pop()
        return super().__exit__(*exc)

    @classmethod
    def current(cls) -> MetaAutocast | None:
        return cls._active[-1] if cls._active else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            if self.dtype is not None:
                args = _cast(args[:3], self.dtype) + list(args[3:])
            if self.efficient_sdpa:
                return efficient_attention(*args, **kwargs)
            return func(*args, **kwargs)
        if self.dtype is not None:
            if func in _LOWER:
                args = _cast(args, self.dtype)
                kwargs = dict(zip(kwargs, _cast(kwargs.values(), self.dtype), strict=True))
            elif func in _FLOAT32:
                args = _cast(args, torch.float32)
                if "weight" in kwargs or "bias" in kwargs:
                    kwargs = dict(zip(kwargs, _cast(kwargs.values(), torch.float32), strict=True))
        return func(*args, **kwargs)


def checkpoint_with_autocast(module, *args):
    """diffusers' gradient-checkpointing function (non-reentrant `torch.utils.checkpoint`), with
    the `MetaAutocast` active at forward time re-entered for the recomputation in backward, as
    torch.utils.checkpoint does for real autocast."""
    from torch.utils.checkpoint import checkpoint

    mode = MetaAutocast.current()

    def contexts():
        again = MetaAutocast(mode.dtype, mode.efficient_sdpa) if mode else contextlib.nullcontext()
        return contextlib.nullcontext(), again

    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)


def autocast_factory(dtype: torch.dtype | None, efficient_sdpa: bool = True):
    """A zero-argument context-manager factory (what `update.score_log_probs` takes)."""

    def factory():
        return MetaAutocast(dtype, efficient_sdpa)

    return factory


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


def module_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of the parameters and buffers of `modules` (None entries skipped)."""
    tensors = []
    for module in modules:
        if module is not None:
            tensors += list(module.parameters()) + list(module.buffers())
    return storage_bytes(tensors)


@contextlib.contextmanager
def counting(device_type: str | None = None, round_to: int = 1, autocast=None):
    """`MemoryCounter` (and an optional `MetaAutocast`) for a `with` block."""
    with MemoryCounter(device_type, round_to) as counter:
        with autocast if autocast is not None else contextlib.nullcontext():
            yield counter
