"""The method plugin contract.

A method is one class that reads like its paper's algorithm box::

    @register_method("name")
    class MyMethod(Method):
        paper = "..."; heterogeneous = True
        @dataclass
        class Params: ...            # hparam() fields: CLI options, `fedbench list`, validation

        def client_init(self, client): ...          # declare the client's private modules
        def server_init(self, server): ...          # -> first broadcast (or None)
        def client_update(self, client, broadcast): # local training -> upload
        def server_update(self, server, uploads):   # uploads -> next broadcast
        def predict(self, client, x): ...           # logits for evaluation
        # optional:
        def download(self, server, client, state):  # what this client receives (default: the broadcast)
        def global_predict(self, server, x): ...    # logits of the global model, for methods with one

Uploads, broadcasts and downloads are tensors or nested mappings of tensors; the engine counts their
bytes, per client as sent. Methods report named metrics (``server.report``, ``client.report``) that the
store keeps per round and per client. A method never touches the store, the CLI or the meters.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fedbench.models.cnn import ModuleSpec


@dataclass
class Upload:
    client: int
    weight: float  # aggregation weight, normalised over this round's participants (--agg-weight)
    payload: Any


class Party:
    """Common part of a client and the server: named private modules backed by tensors."""

    def __init__(self, runtime) -> None:
        self._rt = runtime
        self.specs: dict[str, ModuleSpec] = {}

    @property
    def device(self) -> torch.device:
        return self._rt.device

    @property
    def num_classes(self) -> int:
        return self._rt.num_classes

    def own(self, name: str, spec: ModuleSpec) -> nn.Module:
        """Declare a private module ``name`` built from ``spec`` (seeded initialisation)."""
        return self._rt.create_module(self, name, spec)

    def module(self, name: str) -> nn.Module:
        return self._rt.bound_module(self, name)

    @property
    def backbone(self) -> nn.Module:
        """The frozen pretrained backbone shared by every party (federated-LoRA family only)."""
        if self._rt.backbone is None:
            raise RuntimeError("this run has no backbone (the method did not ask for one)")
        return self._rt.backbone

    def report(self, name: str, value: float) -> None:
        """A named metric of this round: per client (``client.report``) or of the round (``server.report``)."""
        self._rt.report(self, name, value)

    def count_macs(self, macs: int) -> None:
        """Declare work done outside nn.Modules (an SVD, a closed-form solve) as multiply-adds.

        Module calls are metered automatically; use this only for tensor algebra a method runs by
        hand, with the formula stated next to the call.
        """
        self._rt.meter.add(macs)


class Client(Party):
    """What a method sees of one client during its local round or evaluation."""

    def __init__(self, runtime, cid: int, arch: str, model_spec: ModuleSpec, sizes: dict[str, int],
                 classes: torch.Tensor, label_counts: torch.Tensor | None = None) -> None:
        super().__init__(runtime)
        self.id = cid
        self.arch = arch            # e.g. "cnn3"
        self.model_spec = model_spec  # the client's assigned heterogeneous model
        self.sizes = sizes          # samples per split: {"train", "val", "test"}
        self.classes = classes      # int64 tensor of the classes present in its training data
        # int64 tensor (num_classes,): samples per class in its training split (the client's own data)
        self.label_counts = label_counts
        self.round = 0
        self.streams = 0  # data-order streams drawn this round (engine bookkeeping)

    @property
    def n_train(self) -> int:
        return self.sizes["train"]

    def batches(self, epochs: int = 1, *, augment: bool = True, shuffle: bool = True, count: bool = True
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches (x float NCHW on device, y int64), reshuffled every epoch (seeded).

        ``count=False`` for passes that do not train (e.g. collecting prototypes): their samples are
        not added to the client's trained-sample count (their FLOPs are metered all the same).
        """
        return self._rt.train_batches(self, epochs, augment, shuffle, count)

    def optimizer(self, params) -> torch.optim.Optimizer:
        """The run's local optimiser (``--optimizer``, with the round's learning rate of ``--lr-schedule``)."""
        return self._rt.make_optimizer(params, t=self.round)

    def step(self, opt: torch.optim.Optimizer | tuple[torch.optim.Optimizer, ...], loss: torch.Tensor) -> None:
        """zero_grad, backward, clip to the run's gradient-norm limit, step. A tuple of optimisers: one
        backward of ``loss``, then each clipped on its own parameters and stepped."""
        self._rt.optimizer_step(opt, loss)


class Server(Party):
    """The server: may own modules (a global model, a header) and train them (metered as server)."""

    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.round = 0  # the round being aggregated (1-based), set by the engine

    def optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        return self._rt.make_optimizer(params, lr=lr)

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        self._rt.optimizer_step(opt, loss)


class Method(abc.ABC):
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""  # the official code (GitHub owner/repo), or what was read where none exists
    heterogeneous: ClassVar[bool] = True
    # "selected": the broadcast goes to each participant at the start of its round.
    # "all": after aggregation it goes to every client (receive() is called; bytes counted for all).
    push: ClassVar[str] = "selected"
    family: ClassVar[str] = "mhpfl"  # "mhpfl" (heterogeneous models) or "federated-lora" (shared backbone)
    rule_revision: ClassVar[int] = 0
    """Bumped when a fix changes what the method computes under unchanged options (a fidelity fix of its rule).
    A non-zero revision enters the run's identity (``RunConfig.canonical_json``), so a results store never
    serves a result of the old rule for the new one; 0 leaves every stored run id as it was."""

    @dataclass
    class Params:
        pass

    def __init__(self, params, run) -> None:
        self.hp = params
        self.run = run  # read-only view of the run config (epochs, num_classes, ...)

    @classmethod
    def label(cls, params) -> str:
        return cls.name

    def local_steps_of(self, client) -> int:
        """Batches of one local training of ``client`` (``client.batches(run.epochs)``): ``--local-steps``
        where set, else epochs x ceil(n_train / batch size). What a joint or stacked pass plans with."""
        run = self.run
        if getattr(run, "local_steps", 0) > 0:
            return run.local_steps
        return run.epochs * math.ceil(client.n_train / run.batch_size)

    @classmethod
    def warmup_rounds(cls, params) -> int:
        """Rounds 1..W of the run that are a one-time warm-up (local training before the method federates):
        the report counts their computation and bytes as one-time costs, not per-round ones. Default 0."""
        return 0

    @classmethod
    def backbone_request(cls, params) -> dict | None:
        """What shared backbone the run needs ({"name", "init", "model_path"}), or None (MHPFL methods)."""
        return None

    # --- the algorithm -------------------------------------------------------------------------
    def setup(self, server: Server, clients: list[Client]) -> None:
        """Called once before any client_init: a method may size per-client state (ranks) here."""
        return None

    def client_init(self, client: Client) -> None:
        client.own("model", client.model_spec)

    def server_init(self, server: Server):
        return None

    @abc.abstractmethod
    def client_update(self, client: Client, broadcast):
        """Local training of one participant given the server's broadcast; returns its upload."""

    def server_update(self, server: Server, uploads: list[Upload]):
        return None

    def download(self, server: Server, client: Client, state):
        """What ``client`` receives at the start of its round (or, with push == "all", after aggregation):
        by default the broadcast itself; a method may send each client its own payload (its rank, its
        personalised part). Its bytes are counted for that client."""
        return state

    def receive(self, client: Client, broadcast) -> None:
        """Only for push == "all": install the broadcast on a client outside its own round."""
        return None

    def view(self, client: Client, payload) -> None:
        """The ``pfllib`` evaluation protocol: put ``payload`` (this client's download of the new broadcast)
        where the client's prediction would use it at the start of its next round, before any training, as
        ``client_update`` would install it. The engine restores the client's modules afterwards and counts
        no bytes (the view is the protocol's, not the method's communication). Default: nothing to put
        (the prediction does not depend on the broadcast, or ``push == "all"`` already delivered it)."""
        return None

    def predict(self, client: Client, x: torch.Tensor) -> torch.Tensor | None:
        """Logits for evaluation; None means 'undefined' (stored as such, never as 0)."""
        return client.module("model")(x)[0]

    def global_predict(self, server: Server, x: torch.Tensor) -> torch.Tensor | None:
        """Logits of the global model, for methods that have one (evaluated on the union of the
        clients' test splits). Not overridden: the method has no global model."""
        return None

    # --- optional: a round's participants in one batched pass (engine option --client-batching) ---------
    def batchable(self) -> bool:
        """Whether ``client_update_many`` trains the participants jointly, with exactly the training each
        would do alone (same batches, steps, optimiser state, clip; equal within float tolerance). Default
        False: the engine calls ``client_update`` per participant. A method opts in only where its local
        training is its family's standard one (``FederatedLoRA``, ``StandardTraining``)."""
        return False

    @property
    def batching_pays(self) -> bool:
        """Whether ``--client-batching auto`` uses the joint pass on any device (default False)."""
        return False

    def batching_pays_on(self, device: torch.device) -> bool:
        """Whether ``--client-batching auto`` uses the joint pass on ``device`` (a rule measured per device);
        default: ``batching_pays``."""
        return self.batching_pays

    def predicts_with_model(self) -> bool:
        """Whether evaluation is the default ``predict`` (the logits of the client's own "model", a CNN of
        models/cnn.py) for every client: the engine may then evaluate the clients that share a CNN in one
        stacked pass (with ``--client-batching``), the same predictions. False where ``predict`` is
        overridden (a global model, prototypes, an adapter) or the family is not MHPFL."""
        return self.family == "mhpfl" and getattr(self.predict, "__func__", None) is Method.predict

    def client_update_many(self, clients: list[Client], payloads: list) -> list:
        """``client_update`` of several participants, in order (called only when ``batchable``); returns their
        uploads. Default: one by one, each client's MACs credited to it."""
        ups = []
        for c, p in zip(clients, payloads, strict=True):
            with joint_pass([(c, 1)]):
                ups.append(self.client_update(c, p))
        return ups


# --- helpers methods use -----------------------------------------------------------------------

def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's parameters, ready to send."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@torch.no_grad()
def load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy received tensors into a module's parameters (names must match)."""
    params = dict(module.named_parameters())
    for k, v in tensors.items():
        params[k].copy_(v)


def weighted_mean(uploads: list[Upload], key=lambda p: p):
    """sum_k w_k * payload_k over (nested mappings of) tensors; weights as the engine set them."""
    return _combine([(u.weight, key(u.payload)) for u in uploads])


def mean(payloads: list) -> Any:
    """Unweighted mean of payloads (several HtFLlib server rules)."""
    n = len(payloads)
    return _combine([(1.0 / n, p) for p in payloads])


def _combine(items):
    first = items[0][1]
    if isinstance(first, torch.Tensor):
        out = torch.zeros_like(first, dtype=torch.float32 if not first.is_floating_point() else first.dtype)
        for w, t in items:
            out.add_(t, alpha=w)
        return out
    return {k: _combine([(w, p[k]) for w, p in items]) for k in first}


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Freeze parameters for a phase (restores requires_grad afterwards)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def joint_pass(segments: list[tuple[Client, int]]):
    """Context of one pass over the concatenated batches of several clients ([(client, samples)] in
    batch order; batched local training): the MACs of module calls inside it are credited to each client
    by its samples, exactly what the same calls on its batch alone count."""
    return segments[0][0]._rt.meter.batch_split([(c.id, n) for c, n in segments])


def call_macs(client: Client, module: nn.Module, x: torch.Tensor, *, weight_grad: bool, input_grad: bool) -> int:
    """What the engine's meter counts for one call of the metered leaf ``module`` on ``x`` (forward, plus the
    weight and input gradients where computed): for a joint pass that runs a layer's arithmetic itself."""
    return client._rt.meter.call_macs(module, x, weight_grad=weight_grad, input_grad=input_grad)


def credit_macs(client: Client, macs: int) -> None:
    """Count multiply-adds for ``client`` by name, also inside a :func:`joint_pass` (per-client work of a
    joint pass, such as its own adapters at its own rank)."""
    client._rt.meter.add(macs, who=client.id)
