"""The MHPFL family's standard local round, shared by the methods that run it, with its batched form.

    client k:  install its download; E epochs of cross-entropy on its own model ("model", its CNN),
               with the run's optimiser (``client.optimizer``) and step (``client.step``: the clip);
               upload what the method sends

A method built on ``StandardTraining`` states only ``install`` and ``upload`` (and its server side). Because
its training is the standard one, the engine may train a round's participants that share a CNN in one
pass (``client_update_many`` through fedbench/engine/stacked.py, ``--client-batching``): the same batches,
steps, optimiser state and clip per client, every row the same. A method that changes the training (its
own loss, a second model, a hook on the gradients) overrides ``client_update`` or ``train_model`` and so is
not ``batchable``: FedLoRA (adapter and two phases), FD and FedProto (regularised losses), FML and FedKD
(two models trained together).
"""

from __future__ import annotations

from itertools import groupby

import torch
import torch.nn.functional as F

from fedbench.engine.stacked import LAYERS, Member, StackedTrainer
from fedbench.methods.base import Client, Method, call_macs, credit_macs, joint_pass


class StandardTraining(Method):
    """E epochs of cross-entropy on the client's "model" between ``install`` and ``upload``."""

    _STANDARD = ("client_update", "train_model")

    def install(self, client: Client, payload) -> None:
        """Put the client's download in place before its training (default: nothing to put)."""
        return None

    def upload(self, client: Client):
        """What the client sends after its training (default: nothing)."""
        return None

    def train_model(self, client: Client) -> None:
        """The standard local training: ``run.epochs`` epochs of CE on the client's own batches."""
        model = client.module("model")
        opt = client.optimizer(model.parameters())
        for x, y in client.batches(self.run.epochs):
            client.step(opt, F.cross_entropy(model(x)[0], y))

    def client_update(self, client: Client, payload):
        self.install(client, payload)
        self.train_model(client)
        return self.upload(client)

    # --- the participants of a round in one pass ----------------------------------------------------------
    def batchable(self) -> bool:
        """True where neither ``client_update`` nor ``train_model`` is overridden (by the class or on the
        instance): the training is the standard one, which the stacked pass reproduces."""
        return all(getattr(getattr(self, n), "__func__", None) is getattr(StandardTraining, n)
                   for n in self._STANDARD)

    def batching_pays_on(self, device: torch.device) -> bool:
        """``--client-batching auto``: the stacked pass on CUDA, where a client-by-client loop of small CNNs
        is bound by kernel launches (not measured yet: benchmarks/batched_clients.py is the script); client by
        client on the CPU, where benchmarks/batched_clients.py measured it slower in every setting on a quiet
        machine (0.82-0.99x; docs/batched-clients.md) and where stored runs keep their numbers bit for bit
        (the stacked pass equals them within float tolerance only)."""
        return device.type == "cuda"

    def client_update_many(self, clients: list[Client], payloads: list) -> list:
        """``client_update`` of every participant: installs, then each group of participants sharing a CNN
        trained in one stacked pass (a group of one trains as alone), then uploads, in the given order."""
        for c, p in zip(clients, payloads, strict=True):
            with joint_pass([(c, 1)]):
                self.install(c, p)
        by_spec = sorted(clients, key=lambda c: str(c.model_spec))
        for _, group in groupby(by_spec, key=lambda c: str(c.model_spec)):
            self.train_group(list(group))
        ups = []
        for c in clients:
            with joint_pass([(c, 1)]):
                ups.append(self.upload(c))
        return ups

    def train_group(self, clients: list[Client]) -> None:
        """``train_model`` of clients that share a CNN, jointly (fedbench/engine/stacked.py)."""
        if len(clients) == 1:
            with joint_pass([(clients[0], 1)]):
                self.train_model(clients[0])
            return
        members = []
        for c in clients:
            model = c.module("model")  # binds the workspace to c's tensors: take them now
            members.append(Member({n: p.detach() for n, p in model.named_parameters()},
                                  c.batches(self.run.epochs), self.local_steps_of(c), tag=c))
        ws = clients[0].module("model")  # the metered workspace all of them share
        probe = torch.zeros(1, device=clients[0].device, requires_grad=True)

        def layer_macs(layer: str, x: torch.Tensor, input_grad: bool) -> int:
            return call_macs(clients[0], getattr(ws, layer), x, weight_grad=True, input_grad=input_grad)

        assert set(LAYERS) <= {n.split(".")[0] for n in members[0].tensors}
        StackedTrainer(members, clients[0].optimizer([probe]), self.run.clip, layer_macs=layer_macs,
                       credit=credit_macs).run()
