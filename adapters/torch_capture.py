"""Capture what every layer of a torch model produced, as a :class:`layerdiff.trace.Trace`.

Two ways to see the layers, same record names either way:

- ``fx``: the model is traced once (``torch.fx`` with every child-less module as a leaf, or the
  graph of an exported program) and the graph is rewritten with a recording call after each
  layer. No per-op Python overhead; the instrumented graph is cached per model.
- ``hooks``: forward hooks on every module plus a ``TorchFunctionMode`` that sees functional and
  tensor ops (``+=``, ``torch.flatten``, ``F.relu``, ...) in the modules' own forward code. This
  runs the model's real Python, so data-dependent control flow works.

Recording unit: a call of a child-less module (its internal functional calls are part of it, so
``nn.ReLU`` is one record, not ``ReLU`` + ``relu``), or a torch op in a container's forward.

Outputs are kept by reference, not copied (a copy per layer costs more than the hooks). What an
in-place op (``ReLU(inplace=True)``, ``+=``, ``x.add_``, ``out=``, ...) is about to overwrite is
cloned just before it runs. On the fx path most of those clones are avoided altogether: when the
graph proves nothing reads the overwritten tensor afterwards and, at run time, no view shares its
memory, the op's out-of-place twin runs instead (same values, new memory). Every kept tensor's
version counter is checked at the end; if something we did not see wrote into one (an in-place op
inside an opaque module or a C++ extension), the capture is rerun cloning every output.
Everything stays on the capture device until one bulk copy to numpy at the end.
"""

from __future__ import annotations

import copy
import inspect
import operator
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from layerdiff.errors import InputSpecError, LayerdiffError
from layerdiff.trace import Trace

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "float16": torch.float16, "bfloat16": torch.bfloat16,
}
# numpy has no bfloat16 (and no float8): such outputs are widened to float32.
_NUMPY_SAFE = {torch.float32, torch.float64, torch.float16, torch.int8, torch.uint8, torch.int16,
               torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128}

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul, operator.setitem,
}
# Ops whose name ends in "_" but that do not write tensor values.
_NOT_VALUE_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "_set_grad_enabled",
                     "record_stream", "pin_memory"}
# Results that are metadata or control flow, never a layer.
_SKIP_OPS = {
    "__get__", "__set__", "size", "dim", "numel", "item", "tolist", "stride", "storage_offset",
    "is_contiguous", "data_ptr", "element_size", "__bool__", "__len__", "__format__", "__repr__",
    "__iter__", "__hash__", "__index__", "__int__", "__float__", "detach", "requires_grad_",
    "_set_grad_enabled", "numpy", "untyped_storage", "dim_order", "getattr", "is_floating_point",
    "is_complex", "__contains__", "__reversed__", "__array__", "_is_view", "sym_size",
}
_DUNDER_OPS = {
    "add": "add", "radd": "add", "iadd": "add", "sub": "sub", "rsub": "sub", "isub": "sub",
    "mul": "mul", "rmul": "mul", "imul": "mul", "truediv": "div", "rtruediv": "div",
    "itruediv": "div", "div": "div", "floordiv": "floordiv", "rfloordiv": "floordiv",
    "ifloordiv": "floordiv", "matmul": "matmul", "rmatmul": "matmul", "imatmul": "matmul",
    "pow": "pow", "rpow": "pow", "ipow": "pow", "mod": "remainder", "rmod": "remainder",
    "imod": "remainder", "neg": "neg", "abs": "abs", "getitem": "getitem", "setitem": "setitem",
    "and": "and", "or": "or", "xor": "xor", "iand": "and", "ior": "or", "ixor": "xor",
    "invert": "invert", "lshift": "lshift", "rshift": "rshift", "pos": "pos",
}


# ----------------------------------------------------------------------------------------------
# op names and in-place detection (shared by both paths)


def _raw_name(func: Any) -> str:
    if isinstance(func, torch._ops.OpOverload):
        return func._opname
    if isinstance(func, str):
        return func
    return getattr(func, "__name__", None) or type(func).__name__


def _op_name(raw: str) -> tuple[str, bool]:
    """Normalised op name (``__iadd__`` -> ``add``, ``relu_`` -> ``relu``) and in-place flag."""
    dunder = raw.startswith("__") and raw.endswith("__")
    core = raw[2:-2] if dunder else raw
    if dunder or core in _DUNDER_OPS:  # Tensor.__iadd__, operator.iadd, operator.getitem
        inplace = core == "setitem" or (core in _DUNDER_OPS and core[0] == "i"
                                        and core[1:] in _DUNDER_OPS)
        return _DUNDER_OPS.get(core, core), inplace
    if raw.endswith("_") and not raw.endswith("__") and raw not in _NOT_VALUE_WRITES:
        return raw.rstrip("_").lstrip("_"), True
    return raw.lstrip("_"), False


def _inplace_position(func: Any) -> int | None:
    """Positional index of an ``inplace`` parameter (``F.dropout(x, p, training, inplace)``)."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


@dataclass(frozen=True)
class _OpInfo:
    name: str
    inplace: bool  # by name: add_, __iadd__, setitem
    inplace_pos: int | None  # position of an ``inplace`` argument
    skip: bool

    @classmethod
    def of(cls, func: Any) -> _OpInfo:
        raw = _raw_name(func)
        name, inplace = _op_name(raw)
        pos = None
        if not inplace and inspect.isfunction(func):
            pos = _inplace_position(func)
        return cls(name, inplace, pos, raw in _SKIP_OPS or name in _SKIP_OPS)

    def written(self, args: tuple, kwargs: dict | None) -> Any:
        """The argument this call writes into, or None."""
        if kwargs:
            if kwargs.get("out") is not None:
                return kwargs["out"]
            if kwargs.get("inplace") is True:
                return args[0] if args else kwargs.get("input")
        if self.inplace:
            return args[0] if args else None
        if self.inplace_pos is not None and len(args) > self.inplace_pos \
                and args[self.inplace_pos] is True:
            return args[0]
        return None


_OP_INFO: dict[Any, _OpInfo] = {}


def _info(func: Any) -> _OpInfo:
    try:
        info = _OP_INFO.get(func)
    except TypeError:  # unhashable callable
        return _OpInfo.of(func)
    if info is None:
        info = _OP_INFO[func] = _OpInfo.of(func)
    return info


def _tensors(obj: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, meta, ...: never shared in practice
        return id(t)


# ----------------------------------------------------------------------------------------------
# handles


@dataclass(frozen=True)
class _Ref:
    """Placeholder in a handle's arguments for the recorded value of one top."""

    top: str


@dataclass(eq=False, slots=True)
class TorchCall:
    """The live side of one record: enough to re-run that one layer.

    ``fn`` is the module (module records) or the torch function/op (op records); it is None
    when a record stands for several ops of an exported graph. ``args``/``kwargs`` are the call's
    arguments with every activation replaced by a reference to the recorded value, so they are
    the values the layer saw even if a later in-place op overwrote the live tensor;
    :attr:`inputs` resolves them and :meth:`run` calls ``fn`` again, optionally with other inputs.
    """

    fn: Any
    args: tuple
    kwargs: dict
    module: str | None
    device: torch.device
    _values: dict[str, tuple[np.ndarray, torch.dtype]] = field(repr=False)
    #: the module's training flags as captured (capture may call eval() and restore after)
    training: bool | None = None

    def _resolve(self, obj: Any, replace: list | None) -> Any:
        if isinstance(obj, _Ref):
            if replace:
                new = replace.pop(0)
                if new is not None:  # other values, in the dtype the layer saw
                    seen = self._values.get(obj.top)
                    t = torch.from_numpy(np.array(new, copy=True)).to(self.device)
                    return t.to(seen[1]) if seen is not None else t
            arr, dtype = self._values[obj.top]
            # A fresh copy: an in-place layer re-run must not write into the trace.
            return torch.from_numpy(np.array(arr)).to(self.device, dtype)
        if isinstance(obj, tuple):
            return tuple(self._resolve(o, replace) for o in obj)
        if isinstance(obj, list):
            return [self._resolve(o, replace) for o in obj]
        if isinstance(obj, dict):
            return {k: self._resolve(v, replace) for k, v in obj.items()}
        return obj

    @property
    def input_tops(self) -> list[str]:
        refs: list[str] = []

        def walk(o: Any) -> None:
            if isinstance(o, _Ref):
                refs.append(o.top)
            elif isinstance(o, (list, tuple)):
                for x in o:
                    walk(x)
            elif isinstance(o, dict):
                for x in o.values():
                    walk(x)

        walk((self.args, self.kwargs))
        return refs

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The activation inputs as the layer saw them (fresh tensors on the capture device)."""
        return [self._resolve(_Ref(t), None) for t in self.input_tops]

    def run(self, *inputs: Any, **kwargs: Any) -> list[np.ndarray]:
        """Call the layer again; ``inputs`` replace its activation inputs in order (None keeps
        the recorded one), ``kwargs`` override keyword arguments. Returns the outputs as numpy.
        """
        if self.fn is None:
            raise LayerdiffError(f"record of {self.module or 'graph'} spans several graph ops; "
                                 "it cannot be re-run on its own")
        replace = list(inputs)
        args = self._resolve(self.args, replace)
        kw = self._resolve(self.kwargs, replace)
        kw.update(kwargs)
        modes = []
        if isinstance(self.fn, nn.Module) and self.training is not None:
            # Re-run in the mode it was captured in; a training BatchNorm would otherwise use
            # batch statistics and update the user's running buffers.
            modes = [(m, m.training) for m in self.fn.modules()]
            self.fn.train(self.training)
        try:
            with torch.no_grad():
                out = self.fn(*args, **kw)
        finally:
            for m, flag in modes:
                m.training = flag
        return [_to_numpy(t.detach().cpu())[0] for t in _tensors(out, [])]


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, torch.dtype]:
    dtype = t.dtype
    if t.requires_grad:
        t = t.detach()
    if dtype not in _NUMPY_SAFE:
        t = t.float() if t.is_floating_point() else t.to(torch.int64)
    elif t.is_complex():
        t = t.resolve_conj().resolve_neg()
    return t.numpy(), dtype


_DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in
                (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)}


# ----------------------------------------------------------------------------------------------
# the recorder: names, bottoms, lazy copies


class _Entry:
    __slots__ = ("name", "kind", "attrs", "tensors", "versions", "cloned", "bottoms", "call")

    def __init__(self, name, kind, attrs, tensors, versions, bottoms, call):
        self.name = name
        self.kind = kind
        self.attrs = attrs
        self.tensors = tensors
        self.versions = versions
        self.cloned = [versions is None] * len(tensors)
        self.bottoms = bottoms
        self.call = call  # (fn, args template, kwargs template, module path)


class _Recorder:
    """Collects records during one forward. Kept lean: it runs once per layer."""

    def __init__(self, lazy: bool, device: torch.device) -> None:
        self.lazy = lazy
        self.device = device
        self.entries: list[_Entry] = []
        self.values: dict[str, tuple[np.ndarray, torch.dtype]] = {}
        # id(tensor) -> (tensor, top). Holding the tensor keeps its id from being reused.
        self._producer: dict[int, tuple[torch.Tensor, str]] = {}
        self._pending: dict[int, list[tuple[_Entry, int]]] = {}
        self._counts: dict[str, int] = {}
        self._taken: set[str] = set()
        self.clones = 0

    def add_input(self, name: str, t: torch.Tensor) -> None:
        self._producer[id(t)] = (t, name)
        self._taken.add(name)

    def top_of(self, t: torch.Tensor) -> str | None:
        p = self._producer.get(id(t))
        return p[1] if p is not None and p[0] is t else None

    def _args_template(self, args: tuple, bottoms: list[str]) -> tuple:
        # Fast path for the usual flat argument tuple.
        out = []
        producer = self._producer
        for a in args:
            if isinstance(a, torch.Tensor):
                p = producer.get(id(a))
                if p is None or p[0] is not a:
                    out.append(a)
                    continue
                if p[1] not in bottoms:
                    bottoms.append(p[1])
                out.append(_Ref(p[1]))
            elif isinstance(a, (list, tuple, dict)):
                out.append(self._template(a, bottoms))
            else:
                out.append(a)
        return tuple(out)

    def _template(self, obj: Any, bottoms: list[str]) -> Any:
        """``obj`` with every recorded activation replaced by a :class:`_Ref`."""
        if isinstance(obj, torch.Tensor):
            p = self._producer.get(id(obj))
            if p is None or p[0] is not obj:
                return obj
            if p[1] not in bottoms:
                bottoms.append(p[1])
            return _Ref(p[1])
        if isinstance(obj, (list, tuple)):
            items = [self._template(o, bottoms) for o in obj]
            return items if isinstance(obj, list) else tuple(items)
        if isinstance(obj, dict):
            return {k: self._template(v, bottoms) for k, v in obj.items()}
        return obj

    def _name(self, base: str) -> tuple[str, int]:
        call = self._counts.get(base, 0)
        self._counts[base] = call + 1
        name = base if call == 0 else f"{base}#{call}"
        while name in self._taken:  # a module and an op (or an input) with the same name
            name += "'"
        self._taken.add(name)
        return name, call

    def record(self, base: str, kind: str, attrs: dict[str, Any], out: Any, args: tuple,
               kwargs: dict | None, fn: Any, op: bool, module: str | None) -> None:
        tensors = [out] if isinstance(out, torch.Tensor) else _tensors(out, [])
        if not tensors:
            return
        bottoms: list[str] = []
        t_args = self._args_template(args, bottoms) if type(args) is tuple \
            else self._template(args, bottoms)
        t_kwargs = self._template(kwargs, bottoms) if kwargs else {}
        if op:
            # Control flow (x.sum() > 0), masks and ops on non-activations are not layers.
            first = tensors[0]
            if not bottoms or first.dim() == 0 or first.dtype == torch.bool:
                return
            if attrs["op"] == "getitem" and self.top_of(first) is not None:
                return  # picking an already-recorded output out of a tuple
        name, call = self._name(base)
        attrs = {**attrs, "call": call}
        if self.lazy:
            entry = _Entry(name, kind, attrs, tensors, [t._version for t in tensors], bottoms,
                           (fn, t_args, t_kwargs, module))
            pending = self._pending
            for k, t in enumerate(tensors):
                key = _storage_key(t)
                if key in pending:
                    pending[key].append((entry, k))
                else:
                    pending[key] = [(entry, k)]
        else:
            entry = _Entry(name, kind, attrs, [t.clone() for t in tensors], None, bottoms,
                           (fn, t_args, t_kwargs, module))
        producer = self._producer
        producer[id(tensors[0])] = (tensors[0], name)
        for k in range(1, len(tensors)):
            producer[id(tensors[k])] = (tensors[k], f"{name}:{k}")
        self.entries.append(entry)

    def before_write(self, target: Any) -> None:
        """An op is about to write into ``target``: copy recorded values that share its memory."""
        if not self.lazy or target is None:
            return
        for t in _tensors(target, []):
            waiting = self._pending.pop(_storage_key(t), None)
            if waiting:
                for entry, k in waiting:
                    entry.tensors[k] = entry.tensors[k].clone()
                    entry.cloned[k] = True
                    self.clones += 1

    def intact(self) -> bool:
        """True when no kept (uncloned) tensor was written after it was recorded."""
        for e in self.entries:
            if e.versions is None:
                continue
            for k, t in enumerate(e.tensors):
                if not e.cloned[k] and t._version != e.versions[k]:
                    return False
        return True

    def protect(self, tensors: list[torch.Tensor]) -> None:
        """Copy records that alias ``tensors`` (parameters, buffers) so later updates of the
        model cannot change the trace."""
        if self.lazy and self._pending:
            for t in tensors:
                if _storage_key(t) in self._pending:
                    self.before_write(t)

    def to_trace(self, trace: Trace) -> Trace:
        flat = [t for e in self.entries for t in e.tensors]
        if self.device.type != "cpu":
            # One bulk copy after the forward: a synchronising copy per hook costs far more.
            flat = [t.to("cpu", non_blocking=True) for t in flat]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        i = 0
        values = self.values
        params_of: dict[int, dict[str, np.ndarray]] = {}
        for e in self.entries:
            n = len(e.tensors)
            converted = [_to_numpy(t) for t in flat[i:i + n]]
            i += n
            outs = [c[0] for c in converted]
            tops = [e.name] + [f"{e.name}:{k}" for k in range(1, n)]
            for top, c in zip(tops, converted, strict=True):
                values[top] = c
            attrs = e.attrs
            attrs["dtype"] = _DTYPE_NAMES.get(converted[0][1]) or str(converted[0][1])[6:]
            fn, t_args, t_kwargs, module = e.call
            handle = TorchCall(fn, t_args, t_kwargs, module, self.device, values,
                               fn.training if isinstance(fn, nn.Module) else None)
            params = None
            if isinstance(fn, nn.Module):
                if id(fn) not in params_of:
                    params_of[id(fn)] = _LazyParams(fn)
                params = params_of[id(fn)]
            trace.add(e.name, e.kind, tops, e.bottoms, outs, attrs, handle, params)
        return trace


_PARAMS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _LazyParams(Mapping):
    """A record's parameters, read from the module when first asked for (alignment, audits,
    saving), so a capture whose parameters nobody reads pays nothing for them."""

    def __init__(self, module: nn.Module) -> None:
        self._module: nn.Module | None = module
        self._params: dict[str, np.ndarray] | None = None

    def _get(self) -> dict[str, np.ndarray]:
        if self._params is None:
            self._params = _module_params(self._module)
            self._module = None
        return self._params

    def __getitem__(self, key: str) -> np.ndarray:
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _module_params(m: nn.Module) -> dict[str, np.ndarray]:
    """A module's own parameters and buffers, for weight audits and fingerprint alignment.

    On the CPU these are read-only views (no copy of a large model's weights per capture).
    Reused across captures while no tensor of the module was replaced or written (its
    storage and ``_version`` are unchanged): repeated captures pay nothing for them.
    """
    tensors = [*m._parameters.items(), *m._buffers.items()]
    key = tuple((n, t.data_ptr(), t._version, t.dtype, t.device) for n, t in tensors
                if t is not None)
    hit = _PARAMS_CACHE.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = _read_params(m)
    _PARAMS_CACHE[m] = (key, out)
    return out


def _read_params(m: nn.Module) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    buffers = dict(m.named_buffers(recurse=False))
    for name, t in [*m.named_parameters(recurse=False), *buffers.items()]:
        if t is None or not t.is_floating_point():
            continue
        arr = _to_numpy(t.detach().cpu())[0]
        if name in buffers:  # buffers (BN running stats) may change later: keep a copy
            arr = arr.copy()
        arr.flags.writeable = False
        out[name] = arr
    return out


# ----------------------------------------------------------------------------------------------
# hooks path


class _HookMode(TorchFunctionMode):
    """Sees every torch call in Python forward code. Inside a leaf module it only watches for
    in-place writes; in container code it records ops."""

    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec
        self.depth = 0
        self.scope: list[str] = [""]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        info = _info(func)
        target = None
        if info.inplace or kwargs or info.inplace_pos is not None:
            target = info.written(args, kwargs)
            if target is not None:
                self.rec.before_write(target)
        out = func(*args, **(kwargs or {}))
        if self.depth or info.skip:
            return out
        scope = self.scope[-1]
        base = f"{scope}.{info.name}" if scope else info.name
        attrs: dict[str, Any] = {"op": info.name, "scope": scope}
        if target is not None:
            attrs["inplace"] = True
        self.rec.record(base, info.name, attrs, out, args, kwargs, func, True, None)
        return out


def _leaf(m: nn.Module) -> bool:
    # A scripted submodule runs as compiled code: nothing inside it can be seen.
    return not m._modules or isinstance(m, torch.jit.ScriptModule)


def _kind(m: nn.Module) -> str:
    """Record kind of a module: its class name (a scripted module's original class name)."""
    if isinstance(m, torch.jit.ScriptModule):
        return getattr(m, "original_name", None) or type(m).__name__
    return type(m).__name__


class _ScriptCall(nn.Module):
    """Stands in for a scripted submodule during a hooks capture (ScriptModules take no hooks).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _run_hooks(model: nn.Module, inputs: list[torch.Tensor], rec: _Recorder) -> None:
    mode = _HookMode(rec)
    handles = []

    def container_pre(path):
        def pre(m, args):
            mode.scope.append(path)
        return pre

    def container_post(m, args, out):
        mode.scope.pop()

    def leaf_pre(m, args):
        mode.depth += 1

    def leaf_post(path, kind):
        def post(m, args, kwargs, out):
            mode.depth -= 1
            if mode.depth:
                return None
            with torch._C.DisableTorchFunction():  # our own tensor calls are not the model's
                rec.record(path, kind, {"module": path}, out, args, kwargs, m, False, path)
            return None  # returning a value would replace the module's output
        return post

    root_name = type(model).__name__
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, m in _hookable(model):
            if isinstance(m, torch.jit.ScriptModule) and path:
                parent_path, _, attr = path.rpartition(".")
                parent = model.get_submodule(parent_path)
                kind = _kind(m)
                swapped.append((parent, attr, m))
                m = parent._modules[attr] = _ScriptCall(m)
            else:
                kind = type(m).__name__
            if _leaf(m) or isinstance(m, _ScriptCall):
                handles.append(m.register_forward_pre_hook(leaf_pre))
                handles.append(m.register_forward_hook(leaf_post(path or root_name, kind),
                                                       with_kwargs=True, always_call=True))
            else:
                handles.append(m.register_forward_pre_hook(container_pre(path)))
                handles.append(m.register_forward_hook(container_post, always_call=True))
        with mode:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for parent, attr, m in swapped:
            parent._modules[attr] = m


def _hookable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules to hook: leaves and containers, but nothing inside a scripted submodule."""
    out: list[tuple[str, nn.Module]] = []
    opaque: list[str] = []
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in opaque):
            continue
        if isinstance(m, torch.jit.ScriptModule):
            opaque.append(path)
        out.append((path, m))
    return out


# ----------------------------------------------------------------------------------------------
# fx path


class _Proxy(fx.Proxy):
    """fx.Proxy lacks ``__iadd__`` & co, so ``out += x`` would trace as ``out = out + x`` and
    lose eager semantics when ``out`` is aliased; trace augmented assignments as themselves."""


def _augmented(op: Callable) -> Callable:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
              "lshift", "rshift", "matmul"):
    setattr(_Proxy, f"__i{_name}__", _augmented(getattr(operator, f"i{_name}")))


class _LeafTracer(fx.Tracer):
    # Child-less modules are the recording unit in both paths, so fx and hooks name alike.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _leaf(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


@dataclass
class _Site:
    base: str
    kind: str
    attrs: dict[str, Any]
    fn: Any
    op: bool
    module: str | None


class _FxRunner:
    """Bound into the instrumented graph as ``self._ld_rec``."""

    def __init__(self, sites: list[_Site]) -> None:
        self.sites = sites
        self.oop: list[tuple[Callable, Callable]] = []  # (in-place fn, out-of-place twin)
        self.rec: _Recorder | None = None

    def rec_(self, i: int, out: Any, args: tuple, kwargs: dict) -> None:
        s = self.sites[i]
        self.rec.record(s.base, s.kind, s.attrs, out, args, kwargs, s.fn, s.op, s.module)

    def pre(self, target: Any) -> None:
        self.rec.before_write(target)

    def ip(self, j: int, x: Any, *args: Any, **kwargs: Any) -> Any:
        """An in-place op whose input nothing reads afterwards (proved on the graph): when no
        view shares its memory either, run the out-of-place twin, so the recorded input needs
        no copy. Otherwise copy what is recorded and run the op in place, as written."""
        inplace_fn, oop_fn = self.oop[j]
        if isinstance(x, torch.Tensor) and _sole_owner(x):
            r = oop_fn(x, *args, **kwargs)
            if isinstance(r, torch.Tensor) and r.dtype == x.dtype and r.shape == x.shape:
                return r
        self.rec.before_write(x)
        return inplace_fn(x, *args, **kwargs)


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _sole_owner(x: torch.Tensor) -> bool:
    """True when no other tensor (a view) shares ``x``'s memory."""
    if _use_count is None:
        return False
    try:
        # the tensor itself + the temporary storage object
        return _use_count(x.untyped_storage()._cdata) <= 2
    except (RuntimeError, AttributeError, TypeError):
        return False


# Modules and ops whose output is always a newly allocated tensor, never an input or a view.
_FRESH_MODULES = tuple(getattr(nn, n) for n in (
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Linear", "Bilinear", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LocalResponseNorm", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d",
    "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "Embedding", "Upsample",
    "Softmax", "LogSoftmax", "GELU", "Sigmoid", "Tanh", "SiLU", "Mish", "Hardswish", "ReLU",
    "ReLU6", "LeakyReLU", "ELU", "CELU", "SELU", "Hardtanh", "Hardsigmoid", "PReLU",
    "Softplus") if hasattr(nn, n))
_FRESH_CALLS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.cat, torch.stack,
    torch.relu, torch.sigmoid, torch.tanh, torch.conv2d, torch.nn.functional.linear,
    torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
    torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.softmax,
    torch.nn.functional.log_softmax, torch.nn.functional.layer_norm,
    torch.nn.functional.batch_norm, torch.nn.functional.group_norm,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "relu", "sigmoid", "tanh", "softmax",
                  "log_softmax", "exp", "log", "sqrt", "rsqrt", "pow", "mean", "sum", "clamp",
                  "abs", "neg", "__add__", "__sub__", "__mul__", "__truediv__", "__matmul__"}
_OOP_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
    operator.ior: operator.or_, operator.ixor: operator.xor, operator.imatmul: operator.matmul,
}


def _fresh(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return isinstance(m, _FRESH_MODULES) and not getattr(m, "inplace", False)
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return not any(r.alias_info is not None for r in t._schema.returns)
        try:
            return t in _FRESH_CALLS and not node.kwargs.get("inplace", False)
        except TypeError:
            return False
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def _out_of_place(node: fx.Node, root: nn.Module) -> tuple[Callable, Callable] | None:
    """(in-place callable, out-of-place twin) for an in-place node, called as fn(x, *args)."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if getattr(m, "inplace", False) is not True:
            return None
        twin = copy.copy(m)  # shares parameters; only the flag differs
        twin.inplace = False
        return m, twin
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
            return getattr(torch.Tensor, name), getattr(torch.Tensor, name[:-1])
        return None
    t = node.target
    if t in _OOP_OPERATORS:
        return t, _OOP_OPERATORS[t]
    if isinstance(t, torch._ops.OpOverload):
        packet = getattr(torch.ops.aten, t._opname.rstrip("_"), None)
        if t.namespace == "aten" and t._opname.endswith("_") and packet is not None \
                and hasattr(packet, t._overloadname):
            return t, getattr(packet, t._overloadname)
        return None
    if node.kwargs.get("inplace") is True:
        def twin(x: Any, *a: Any, _f: Callable = t, **k: Any) -> Any:
            return _f(x, *a, **{**k, "inplace": False})
        return t, twin
    name = getattr(t, "__name__", "")
    if name.endswith("_") and getattr(t, "__module__", None) in ("torch", None) \
            and hasattr(torch, name[:-1]):
        return t, getattr(torch, name[:-1])
    return None


@dataclass
class _FxPlan:
    gm: fx.GraphModule
    runner: _FxRunner


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _innermost_scope(node: fx.Node) -> tuple[str, str, Any]:
    """(stack key, module path, module type) of the innermost module a node ran in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", "", None
    key, val = next(reversed(stack.items()))
    path, typ = val if isinstance(val, tuple) else (val, None)
    if path.startswith("L__self__"):  # dynamo-style names carry no module path
        return key, "", typ
    return key, path, typ


def _type_name(typ: Any) -> str:
    if isinstance(typ, type):
        return typ.__name__
    return str(typ).rsplit(".", 1)[-1] if typ else "module"


_SCHEMA_WRITES: dict[Any, list[tuple[int, str]]] = {}


def _fx_written(node: fx.Node, gm: fx.GraphModule) -> list[Any]:
    """Arguments a node writes into, decided from the graph (the version check backs it up)."""
    args, kwargs = node.args, node.kwargs
    found: list[Any] = []
    if kwargs.get("out") is not None:
        found.append(kwargs["out"])
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if getattr(m, "inplace", False) is True and args:
            found.append(args[0])
    elif node.op == "call_method":
        if _op_name(node.target)[1] and args:
            found.append(args[0])
    elif node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            writes = _SCHEMA_WRITES.get(t)
            if writes is None:
                writes = _SCHEMA_WRITES[t] = [
                    (i, a.name) for i, a in enumerate(t._schema.arguments)
                    if a.alias_info is not None and a.alias_info.is_write]
            for i, name in writes:
                found.append(args[i] if i < len(args) else kwargs.get(name))
        elif t in _INPLACE_OPERATORS:
            found.append(args[0])
        else:
            info = _info(t)
            w = info.written(args, dict(kwargs))
            if w is not None:
                found.append(w)
    return [f for f in found if isinstance(f, (fx.Node, list, tuple))]


def _defaults_left_out(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Arguments the call leaves at their defaults: traced as constants, so that
    ``if mask is None:`` takes the branch the real call takes."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[n_inputs:]
            if p.default is not p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _build_fx(model: nn.Module, n_inputs: int) -> _FxPlan:
    if isinstance(model, fx.GraphModule):
        graph = copy.deepcopy(model.graph)
        root: nn.Module = model
    else:
        for path, m in model.named_modules():
            if not _leaf(m) and (m._forward_hooks or m._forward_pre_hooks):
                # fx traces through containers, so their hooks would not run
                raise RuntimeError(f"module '{path}' has forward hooks")
        graph = _LeafTracer().trace(model, concrete_args=_defaults_left_out(model, n_inputs)
                                    or None)
        root = model
    nodes = list(graph.nodes)
    aten = any(isinstance(n.target, torch._ops.OpOverload) for n in nodes)
    # In an exported (aten-level) graph a module is a run of ops under one innermost module
    # that has no called children: group them into one module record.
    parents: set[str] = set()
    for n in nodes:
        path = _innermost_scope(n)[1]
        while "." in path:
            path = path.rsplit(".", 1)[0]
            parents.add(path)
    groups: dict[fx.Node, list[fx.Node]] = {}  # last node of a group -> members
    if aten:
        run: list[fx.Node] = []
        run_key = None
        for n in nodes + [None]:
            key, path = (None, "")
            if n is not None and n.op in ("call_function", "call_method"):
                key, path, _ = _innermost_scope(n)
                if not path or path in parents:
                    key = None
            if key != run_key or key is None:
                if run_key is not None and run:
                    groups[run[-1]] = run
                run = []
            run_key = key
            if key is not None:
                run.append(n)

    sites: list[_Site] = []
    runner = _FxRunner(sites)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else nodes[0]
    with graph.inserting_after(anchor):
        rec_node = graph.get_attr("_ld_rec")
    grouped = {m for members in groups.values() for m in members}

    # What may share an object with what: a node that writes into its first argument returns
    # that argument; a fresh node returns new memory; anything else is unknown (None).
    order = {n: i for i, n in enumerate(nodes)}
    writes = {n: _fx_written(n, root) for n in nodes
              if n.op in ("call_module", "call_function", "call_method")}
    fresh = {n: _fresh(n, root) for n in writes}
    first_arg = {n: n.args[0] if n.args else None for n in writes}  # before rewriting
    alias_memo: dict[fx.Node, set[fx.Node] | None] = {}

    def aliases(x: fx.Node) -> set[fx.Node] | None:
        if x not in alias_memo:
            w = writes.get(x) or []
            if fresh.get(x):
                alias_memo[x] = {x}
            elif len(w) == 1 and w[0] is first_arg[x] and isinstance(w[0], fx.Node):
                inner = aliases(w[0])
                alias_memo[x] = None if inner is None else inner | {x}
            else:
                alias_memo[x] = None
        return alias_memo[x]

    def dead_after(x: fx.Node, n: fx.Node) -> bool:
        same = aliases(x)
        return same is not None and all(
            order.get(u, -1) <= order[n] for a in same for u in a.users)

    for n in nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        site: _Site | None = None
        rec_args: tuple = (n, n.args, n.kwargs)
        if n.op == "call_module":
            m = root.get_submodule(n.target)
            site = _Site(n.target, _kind(m), {"module": n.target}, m, False, n.target)
        elif n in groups:
            members = groups[n]
            member_set = set(members)
            outs = tuple(m for m in members
                         if any(u not in member_set for u in m.users) or m is n)
            ins: list[fx.Node] = []
            for m in members:
                for a in m.all_input_nodes:
                    if a not in member_set and a.op != "get_attr" and a not in ins:
                        ins.append(a)
            _, path, typ = _innermost_scope(n)
            single = len(members) == 1
            site = _Site(path, _type_name(typ), {"module": path}, n.target if single else None,
                         False, path)
            rec_args = (outs if len(outs) > 1 else outs[0],
                        n.args if single else tuple(ins), n.kwargs if single else {})
        elif n not in grouped:
            raw = _raw_name(n.target)
            name, inplace = _op_name(raw)
            if raw not in _SKIP_OPS and n.target is not getattr and name not in _SKIP_OPS:
                _, scope, _ = _innermost_scope(n)
                attrs: dict[str, Any] = {"op": name, "scope": scope}
                if inplace or n.target in _INPLACE_OPERATORS:
                    attrs["inplace"] = True
                fn = n.target if n.op == "call_function" else getattr(torch.Tensor, n.target,
                                                                      None)
                site = _Site(f"{scope}.{name}" if scope else name, name, attrs, fn, True, None)

        written = writes[n]
        twin = None
        if len(written) == 1 and n.args and written[0] is n.args[0] \
                and isinstance(written[0], fx.Node) and dead_after(written[0], n):
            twin = _out_of_place(n, root)
        if twin is not None:
            runner.oop.append(twin)
            n.op, n.target = "call_method", "ip"
            n.args = (rec_node, len(runner.oop) - 1, *n.args)
        else:
            for target in written:
                with graph.inserting_before(n):
                    graph.call_method("pre", (rec_node, target))
        if site is None:
            continue
        sites.append(site)
        with graph.inserting_after(n):
            graph.call_method("rec_", (rec_node, len(sites) - 1, *rec_args))
    # A dict root: GraphModule takes the referenced submodules/tensors from it, and the
    # caller's model never gains our attribute.
    attrs_used: dict[str, Any] = {"_ld_rec": runner}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module") and n.target != "_ld_rec":
            attrs_used[n.target] = _fetch(root, n.target)
    gm = fx.GraphModule(attrs_used, graph, class_name=type(model).__name__)
    return _FxPlan(gm, runner)


# Instrumented graphs per model, with the state they were built for (a retrace is needed when
# a submodule, a parameter/buffer object or a training flag changed).
_FX_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _model_key(model: nn.Module, mods: list[tuple[str, nn.Module]] | None = None) -> tuple:
    parts: list[Any] = []
    for _, m in mods if mods is not None else model.named_modules():
        parts += (id(m), m.training, bool(m._forward_hooks or m._forward_pre_hooks),
                  *map(id, m._parameters.values()), *map(id, m._buffers.values()))
    return tuple(parts)


def _fx_plan(model: nn.Module, n_inputs: int,
             mods: list[tuple[str, nn.Module]] | None = None) -> _FxPlan | str:
    """The cached plan, or why the model does not trace (one line)."""
    key = (n_inputs, *_model_key(model, mods))
    hit = _FX_CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        plan: _FxPlan | str = _build_fx(model, n_inputs)
    except Exception as e:  # noqa: BLE001 - any trace failure means "use hooks"
        plan = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    try:
        _FX_CACHE[model] = (key, plan)
    except TypeError:
        pass
    return plan


def _run_fx(plan: _FxPlan, inputs: list[torch.Tensor], rec: _Recorder) -> None:
    plan.runner.rec = rec
    try:
        plan.gm(*inputs)
    finally:
        plan.runner.rec = None


# ----------------------------------------------------------------------------------------------
# TorchScript: converted to an exported program when torch can; else only the final output

_TS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _script_to_graph(model: nn.Module, inputs: list[torch.Tensor]) -> nn.Module | str:
    hit = _TS_CACHE.get(model)
    if hit is not None:
        return hit
    try:
        import warnings

        from torch._export.converter import TS2EPConverter  # private, hence the guard

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res: nn.Module | str = TS2EPConverter(model, tuple(inputs)).convert().module()
    except Exception as e:  # noqa: BLE001
        res = f"TorchScript conversion failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    _TS_CACHE[model] = res
    return res


# ----------------------------------------------------------------------------------------------
# public entry point


def tf32_flags() -> tuple[bool, bool]:
    """(matrix products, cuDNN convolutions): may float32 work on CUDA round to TF32?

    Read from torch's ``fp32_precision`` settings where they exist (torch >= 2.9): once a user
    set ``torch.backends.fp32_precision``, reading the older ``allow_tf32`` flags raises.
    """
    try:
        return (torch.backends.cuda.matmul.fp32_precision == "tf32",
                torch.backends.cudnn.conv.fp32_precision == "tf32")
    except AttributeError:  # older torch: only the allow_tf32 flags
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 convolutions (cuDNN) and matrix products on CUDA, both on or off.

    Process-wide, as torch's own flags are: the capture records them in ``trace.meta``
    (``allow_tf32_cudnn``/``allow_tf32_matmul``) and every later re-run of a layer sees the same.
    Written through ``fp32_precision`` where torch has it, like :func:`tf32_flags` reads them.
    """
    _write_tf32((enabled, enabled))


def _write_tf32(flags: tuple[bool, bool]) -> None:
    matmul, conv = flags
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if conv else "ieee"
    except AttributeError:  # older torch: only the allow_tf32 flags
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


@contextmanager
def tf32_disabled() -> Iterator[None]:
    """Exact float32 on CUDA inside the block (the precision probe's re-runs), then as before."""
    before = tf32_flags()
    _write_tf32((False, False))
    try:
        yield
    finally:
        _write_tf32(before)


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerdiffError(f"device {device!r} requested but torch.cuda.is_available() is "
                             "False; use device='cpu'")
    return dev


def _prepare_inputs(inputs: Any, device: torch.device, dtype: torch.dtype
                    ) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    if isinstance(inputs, np.ndarray) or isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    if isinstance(inputs, dict):
        named = list(inputs.items())
    elif isinstance(inputs, (list, tuple)):
        named = [("input" if i == 0 else f"input{i}", a) for i, a in enumerate(inputs)]
    else:
        raise InputSpecError(f"inputs must be a dict of arrays or a list of arrays, not "
                             f"{type(inputs).__name__}")
    fed: dict[str, np.ndarray] = {}
    tensors: list[torch.Tensor] = []
    for name, a in named:
        if isinstance(a, torch.Tensor):
            a = _to_numpy(a.detach().cpu())[0]
        try:
            arr = np.array(a)  # a copy: nothing the model does can touch the caller's array
        except Exception as e:  # noqa: BLE001
            raise InputSpecError(f"input '{name}': not an array ({e})") from None
        if arr.dtype == object:
            raise InputSpecError(f"input '{name}': not a numeric array")
        t = torch.from_numpy(arr)
        if t.is_floating_point():
            t = t.to(dtype)  # integer inputs (token ids, indices) keep their type
        # The values as fed, in memory of their own: a model may write into its input.
        fed[name] = _to_numpy(t)[0].copy()
        tensors.append(t.to(device))
    return fed, tensors


def _own_tensors(mods: list[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    """Parameters and buffers (one pass; ``model.parameters()`` walks the tree each time)."""
    return [t for _, m in mods for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None]


def _needs_cast(own: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == "cpu":  # the common case, without building device objects
        return any(not t.is_cpu or (t.dtype != dtype and t.is_floating_point()) for t in own)
    for t in own:
        if t.device.type != device.type or (device.index is not None
                                            and t.device.index != device.index):
            return True
        if t.is_floating_point() and t.dtype != dtype:
            return True
    return False


def capture_torch(
    model: nn.Module,
    inputs: dict[str, np.ndarray] | list[np.ndarray] | np.ndarray,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    keep_train_mode: bool = False,
    prefer_graph: bool = True,
) -> Trace:
    """Run ``model`` once and record every layer's output.

    ``inputs``: a dict ``{name: array}`` is passed as positional arguments in dict order; a list
    as positional arguments named ``input``, ``input1``, ...; one array is named ``input``.
    Floating inputs are cast to ``dtype``; integer inputs keep their type.

    The model is put in ``eval()`` unless ``keep_train_mode``; the training flags are restored
    afterwards. When ``device``/``dtype`` differ from the model's, a deep copy is moved/cast so
    the caller's model is left as it was. ``trace.meta["capture"]`` says which path ran
    (``"fx"`` or ``"hooks"``); see the module docstring for both.
    """
    if dtype not in _DTYPES:
        raise LayerdiffError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if not isinstance(model, nn.Module):
        raise LayerdiffError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tdtype = _DTYPES[dtype]
    dev = _resolve_device(device)
    fed, tensors = _prepare_inputs(inputs, dev, tdtype)

    meta: dict[str, Any] = {
        "framework": "torch",
        "torch_version": torch.__version__,
        "model": type(model).__name__,
        "device": str(dev),
        "dtype": dtype,
        **dict(zip(("allow_tf32_matmul", "allow_tf32_cudnn"), tf32_flags(), strict=True)),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "input_names": list(fed),
    }
    mods = list(model.named_modules())
    arrived = [p or "(root)" for p, m in mods if m.training]
    if arrived:
        meta["arrived_in_train_mode"] = arrived

    work = model
    own = _own_tensors(mods)
    if _needs_cast(own, dev, tdtype):
        try:
            work = copy.deepcopy(model)
        except Exception:  # noqa: BLE001 - uncopyable model: cast the caller's own
            meta["cast_in_place"] = True
        work = work.to(device=dev, dtype=tdtype)
        mods = list(work.named_modules())
        own = _own_tensors(mods)

    flags = [(m, m.training) for _, m in mods]
    if arrived and not keep_train_mode:
        try:
            work.eval()  # the model's own eval(): some override train() (e.g. to freeze BN)
        except NotImplementedError:
            # torch.export modules: the mode was fixed when the program was exported.
            meta.pop("arrived_in_train_mode", None)
            meta["mode_fixed_at_export"] = True
    meta["training_modules"] = [p or "(root)" for p, m in mods if m.training]
    try:
        trace = _capture(work, tensors, dev, prefer_graph, meta, own, mods, fed)
    finally:
        for m, f in flags:
            if m.training != f:
                m.training = f
    trace.inputs.update(fed)
    # Handles re-run layers from recorded values; model inputs count among them.
    handles = [r.handle for r in trace if isinstance(r.handle, TorchCall)]
    if handles:
        for (name, arr), t in zip(fed.items(), tensors, strict=False):
            handles[0]._values.setdefault(name, (arr, t.dtype))
    return trace


def _capture(model: nn.Module, tensors: list[torch.Tensor], dev: torch.device,
             prefer_graph: bool, meta: dict[str, Any], own: list[torch.Tensor],
             mods: list[tuple[str, nn.Module]], fed: dict[str, np.ndarray]) -> Trace:
    runner: Callable[[_Recorder, list[torch.Tensor]], None]
    graph_model = model
    if isinstance(model, torch.jit.ScriptModule):
        meta["source_format"] = "torchscript"
        conv = _script_to_graph(model, tensors)
        if isinstance(conv, str):
            meta["graph_error"] = conv
            graph_model = None
        else:
            graph_model = conv
    plan: _FxPlan | str | None = None
    # A child-less model is one layer: fx would trace into it, hooks record it as a module.
    if graph_model is not None and (prefer_graph or graph_model is not model) \
            and (isinstance(graph_model, fx.GraphModule) or not _leaf(graph_model)):
        plan = _fx_plan(graph_model, len(tensors), mods if graph_model is model else None)
        if isinstance(plan, str):
            meta["graph_error"] = plan
            plan = None
    if plan is not None:
        meta["capture"] = "fx"
        fx_plan = plan

        def runner(rec: _Recorder, tensors: list[torch.Tensor]) -> None:
            _run_fx(fx_plan, tensors, rec)
    elif isinstance(model, torch.jit.ScriptModule):
        meta["capture"] = "output"  # hooks do not fire inside TorchScript

        def runner(rec: _Recorder, tensors: list[torch.Tensor]) -> None:
            out = model(*tensors)
            rec.record("output", getattr(model, "original_name", "ScriptModule"),
                       {"module": ""}, out, tuple(tensors), {}, model, False, "")
    else:
        meta["capture"] = "hooks"

        def runner(rec: _Recorder, tensors: list[torch.Tensor]) -> None:
            _run_hooks(model, tensors, rec)

    rec = _attempt(runner, tensors, dev, meta, lazy=True)
    if not rec.intact():
        # Something we could not see wrote into a recorded tensor: redo it copying everything,
        # from fresh inputs (the model may have written into the first ones).
        meta["recaptured_eagerly"] = True
        fresh = [torch.from_numpy(fed[n].copy()).to(device=dev, dtype=t.dtype)
                 for n, t in zip(meta["input_names"], tensors, strict=True)]
        rec = _attempt(runner, fresh, dev, meta, lazy=False)
    rec.protect(own)
    meta["lazy_clones"] = rec.clones
    return rec.to_trace(Trace(meta=meta))


def _attempt(runner: Callable[[_Recorder, list[torch.Tensor]], None],
             tensors: list[torch.Tensor],
             dev: torch.device, meta: dict[str, Any], lazy: bool) -> _Recorder:
    rec = _Recorder(lazy, dev)
    for name, t in zip(meta["input_names"], tensors, strict=True):
        rec.add_input(name, t)
    try:
        with torch.no_grad():
            runner(rec, tensors)
    except LayerdiffError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's forward failed on these inputs
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        shapes = ", ".join(f"{n}{tuple(t.shape)}"
                           for n, t in zip(meta["input_names"], tensors, strict=True))
        raise LayerdiffError(f"{meta['model']}: forward raised {type(e).__name__}: {msg} "
                             f"(inputs {shapes})") from e
    return rec
