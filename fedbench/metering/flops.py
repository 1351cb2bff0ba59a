"""FLOP meter: counts the passes a method's code actually runs.

Convention (stated in every table):
* Forward cost of each parametrised leaf module (convolutions, linear layers) per sample comes from
  fvcore, which counts **one multiply-add as one flop** (i.e. MACs). Tables report FLOPs = 2 x MACs.
  Activations, pooling, normalisation layers, bias adds, losses and optimiser updates are not counted
  (``torch.utils.flop_counter`` counts none of them either; fvcore's norm counts are skipped).
* Backward cost of a module call is derived from the forward cost: one forward-equivalent for the
  weight gradient if any of the module's parameters is trained, plus one for the input gradient if
  the input needs a gradient. So a trained layer with trained layers below it costs 3x forward, the
  first layer 2x, a frozen layer that passes gradients down 2x, a frozen layer below every trained
  one (or any pass under ``torch.no_grad``) 1x.
* A module call made with gradients enabled and an output that requires grad is assumed to be
  back-propagated (methods run backward on every training forward they make).

* Parameter-free matrix products (attention's ``q @ k^T`` and ``p @ v``) are counted for modules
  that declare them with a method ``extra_macs_per_sample(x)``: their forward runs under a torch
  function mode that counts every ``matmul``/``bmm``/``@`` from its operands' shapes, and its backward
  as one forward-equivalent per operand that requires a gradient (autograd computes exactly those).
  So every matmul of a transformer step is counted; ``tests/test_metering.py`` checks the total
  against ``torch.utils.flop_counter.FlopCounterMode`` on a ViT training step.
* Server-side algebra (SVD, QR, products of factors) is declared by formula with ``count_macs``; the
  formulas live in ``fedbench/metering/algebra.py``.

The meter wraps the forward of the leaf modules of the workspace modules once; the engine sets
the scope (which client, train or eval, server) around each method call.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections import defaultdict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def _fvcore_macs_per_sample(module: nn.Module, x: torch.Tensor) -> int:
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and tracer warn about torch.jit
        from fvcore.nn import FlopCountAnalysis

        sample = x[:1].detach().float().clone()
        # MACs do not depend on precision; trace in fp32 outside any autocast region
        with torch.autocast(device_type=sample.device.type, enabled=False):
            analysis = FlopCountAnalysis(module, sample)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            return int(analysis.total())


class FlopMeter:
    """Accumulates MACs per (scope, kind); kinds are 'train' and 'eval'."""

    def __init__(self) -> None:
        self.macs: defaultdict = defaultdict(int)
        self._scope = None
        self._kind = None
        self._tracing = False
        self._cost: dict[tuple, int] = {}     # structural key -> cost (one fvcore trace per layer kind)
        self._by_call: dict[tuple, int] = {}  # (id(module), input shape) -> cost: the per-call lookup
        self._attached: dict[int, nn.Module] = {}  # held, so that an id is never reused while cached
        self._split: list[tuple] | None = None  # inside batch_split: [(who, samples)] of a joint pass

    def attach(self, module: nn.Module) -> None:
        """Meter every parametrised leaf of ``module``: its ``forward`` is wrapped so that each call is
        counted (:meth:`_hook`) after it returns. A wrapper, not a forward hook: a module with hooks
        takes torch's slow call path, which cost about as much as the counting itself (~5 us a call)."""
        for m in module.modules():
            if id(m) in self._attached:
                continue
            if isinstance(m, _NORMS) or type(m).__name__.endswith("RMSNorm"):
                continue  # elementwise, like activations (fvcore counts norms, FlopCounterMode does not)
            if next(m.children(), None) is None and any(True for _ in m.parameters(recurse=False)):
                self._meter_leaf(m)
                self._attached[id(m)] = m
            elif hasattr(m, "extra_macs_per_sample"):
                m.forward = _MeteredMatmuls(self, m.forward)
                self._attached[id(m)] = m

    def _meter_leaf(self, m: nn.Module) -> None:
        m.forward = _Metered(self, m, m.forward)

    def _per_sample(self, m: nn.Module, x: torch.Tensor) -> int:
        """MACs per sample of one call of leaf ``m`` on inputs shaped like ``x``."""
        call = (id(m), x.shape[1:])
        cost = self._by_call.get(call)
        if cost is None:
            cost = self._by_call[call] = self._traced_cost(m, x)
        return cost

    def _traced_cost(self, m: nn.Module, x: torch.Tensor) -> int:
        """The fvcore count, traced once per structurally identical layer and input shape."""
        key = (type(m), tuple(p.shape for p in m.parameters(recurse=False)), tuple(x.shape[1:]),
               getattr(m, "stride", None), getattr(m, "padding", None), getattr(m, "groups", None))
        cost = self._cost.get(key)
        if cost is None:
            self._tracing = True
            try:
                cost = _fvcore_macs_per_sample(m, x)
            finally:
                self._tracing = False
            self._cost[key] = cost
        return cost

    def _hook(self, m: nn.Module, inputs, output) -> None:
        """Count one call of leaf ``m`` (forward, plus the backward it implies) in the current scope."""
        if self._scope is None or self._tracing or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        x = inputs[0]
        back = isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled()
        trained = back and any(p is not None and p.requires_grad for p in m._parameters.values())
        self._credit(self.call_macs(m, x, weight_grad=trained, input_grad=back and x.requires_grad))

    def call_macs(self, m: nn.Module, x: torch.Tensor, *, weight_grad: bool, input_grad: bool) -> int:
        """What one call of metered leaf ``m`` on ``x`` counts: its forward, plus one forward-equivalent
        for the weight gradient and one for the input gradient where those are computed (for a joint
        pass that runs the layer's arithmetic outside the module and credits each client its own call)."""
        return self._per_sample(m, x) * x.shape[0] * (1 + int(weight_grad) + int(input_grad))

    def _credit(self, total: int) -> None:
        """Count ``total`` in the current scope; inside :meth:`batch_split`, split over its parties by their
        samples (every metered cost is a per-sample cost times the batch, so each party gets exactly what
        the same call on its own samples alone would have counted)."""
        if self._split is None:
            self.macs[(self._scope, self._kind)] += total
            return
        n = sum(k for _, k in self._split)
        unit, rest = divmod(total, n)
        if rest:
            raise RuntimeError(f"FlopMeter: {total} MACs of a joint pass over {n} samples are not per-sample")
        for who, k in self._split:
            self.macs[(who, self._kind)] += unit * k

    def add(self, macs: int, who=None) -> None:
        """Count work that runs outside metered modules (e.g. an SVD), in the current scope (or, given
        ``who``, in that party's scope of the current kind: per-party work inside a joint pass)."""
        if self._scope is None:
            return
        if who is None:
            self._credit(int(macs))
        else:
            self.macs[(who, self._kind)] += int(macs)

    @contextlib.contextmanager
    def batch_split(self, shares: list[tuple]):
        """A joint pass over the concatenated batches of several parties ([(who, samples)], in order):
        module calls inside it are credited to the parties by their samples (see :meth:`_credit`)."""
        prev = self._split
        self._split = list(shares)
        try:
            yield
        finally:
            self._split = prev

    @contextlib.contextmanager
    def scope(self, who, kind: str):
        prev = self._scope, self._kind
        self._scope, self._kind = who, kind
        try:
            yield
        finally:
            self._scope, self._kind = prev

    def take(self) -> dict:
        """Return and reset the accumulated MACs."""
        out = dict(self.macs)
        self.macs.clear()
        return out


# embeddings are lookups (no multiply-adds): skipped like the norms
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)
_MATMULS = {torch.matmul, torch.bmm, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__,
            torch.Tensor.bmm, torch.Tensor.mm}


def matmul_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    """Multiply-adds of ``a @ b`` with broadcasting batch dimensions."""
    if a.dim() == 1 or b.dim() == 1:
        return max(a.numel(), b.numel())
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    n = 1
    for d in batch:
        n *= d
    return n * a.shape[-2] * a.shape[-1] * b.shape[-1]


class _MatmulCounter(TorchFunctionMode):
    """Counts the parameter-free matmuls of one module call (forward, and the backward they imply)."""

    def __init__(self, meter: FlopMeter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and len(args) >= 2:
            a, b = args[0], args[1]
            fwd = matmul_macs(a, b)
            total = fwd
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
                total += fwd * (int(a.requires_grad) + int(b.requires_grad))
            self.meter._credit(total)
        return out


class _MeteredMatmuls:
    """The forward of a module with parameter-free matmuls (attention): counted while the meter has a scope."""

    __slots__ = ("meter", "forward")

    def __init__(self, meter: FlopMeter, forward) -> None:
        self.meter, self.forward = meter, forward

    def __call__(self, *args, **kwargs):
        if self.meter._scope is None or self.meter._tracing:
            return self.forward(*args, **kwargs)
        with _MatmulCounter(self.meter):
            return self.forward(*args, **kwargs)


class _Metered:
    """The forward of a metered leaf: calls the module's own forward, then reports the call."""

    __slots__ = ("meter", "module", "forward")

    def __init__(self, meter: FlopMeter, module: nn.Module, forward) -> None:
        self.meter, self.module, self.forward = meter, module, forward

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if self.meter._scope is not None:
            self.meter._hook(self.module, args, out)
        return out

    def __deepcopy__(self, memo):
        """A deep copy of a metered module is metered as itself (not as the original)."""
        module = copy.deepcopy(self.module, memo)
        self.meter._attached[id(module)] = module
        return _Metered(self.meter, module, copy.deepcopy(self.forward, memo))
