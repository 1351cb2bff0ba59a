"""The two references every federated-LoRA table needs, on the same backbone, split and budget.

* ``lora-local``: each client trains its own LoRA (and head) alone; nothing travels. What federation
  must beat.
* ``full-ft``: federated full fine-tuning, FedAvg of every backbone weight and the head (clients hold
  full copies; the download is the whole model every round). The quality ceiling LoRA approximates,
  at its communication and memory cost. The backbone stays in evaluation mode (frozen normalisation
  statistics), as in the LoRA runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedbench.errors import ConfigError
from fedbench.lora import algebra
from fedbench.methods.lora_family import FederatedLoRA
from fedbench.models.cnn import ModuleSpec, builder
from fedbench.registry import register_method


@register_method("lora-local")
class LoRALocal(FederatedLoRA):
    code = "none (a reference)"
    paper = "reference: local-only LoRA fine-tuning (no communication)"
    heterogeneous_ranks = True
    sends = ()
    personalised = True
    evaluations = ("personalised",)

    @classmethod
    def display_name(cls) -> str:
        return "Local LoRA"

    def download(self, server, client, state):
        return {}

    def upload(self, client):
        return {}

    def server_update(self, server, uploads):
        return {}


@builder("backbone")
def _build_backbone(name: str, num_classes: int):
    from fedbench.models.backbones import build_backbone
    return build_backbone(name, num_classes)


@register_method("full-ft")
class FullFineTuning(FederatedLoRA):
    code = "none (a reference)"
    paper = "reference: FedAvg of full fine-tuning (McMahan et al., AISTATS 2017) on the pretrained backbone"
    sends = ("model",)

    @classmethod
    def display_name(cls) -> str:
        return "Full FT (FedAvg)"

    @classmethod
    def label(cls, p) -> str:
        return f"Full FT (FedAvg) ({p.backbone}, head={p.head})"

    @classmethod
    def check_config(cls, p, cfg) -> None:
        super().check_config(p, cfg)
        from fedbench.lm import LM_BACKBONES
        if p.backbone in LM_BACKBONES:
            raise ConfigError(f"full-ft rebuilds a vision backbone per client and has no language-tier version "
                              f"(--backbone {p.backbone}); use fedit, flora, flexlora or another LoRA method")

    @classmethod
    def check_backbone(cls, p, cfg, backbone):
        return []

    def setup(self, server, clients):
        self.targets, self.layers = [], {}
        self.ranks = [0] * len(clients)
        self.server, self.clients = server, clients
        self.model_spec = ModuleSpec.of("backbone", name=self.hp.backbone, num_classes=self.run.num_classes)

    def client_init(self, client):
        client.own("model", self.model_spec)

    @torch.no_grad()
    def server_init(self, server):
        model = server.own("model", self.model_spec)
        head = model.head.state_dict()  # a new head for the task; the rest is the pretrained backbone
        model.load_state_dict({**server.backbone.state_dict(), **{f"head.{k}": v for k, v in head.items()}})
        return {}

    def state_of(self, party) -> dict:
        m = party.module("model")
        return {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}

    def download(self, server, client, state):
        return {"model": self.state_of(server)}

    def upload(self, client):
        return {"model": self.state_of(client)}

    @torch.no_grad()
    def install(self, party, payload):
        params = {k: v for k, v in party.module("model").state_dict().items() if v.is_floating_point()}
        if set(payload["model"]) != set(params):
            raise KeyError(f"full-ft: download keys differ from the model's: {sorted(set(payload['model']) ^ set(params))[:3]}")
        for k, v in payload["model"].items():
            params[k].copy_(v)

    def train(self, client):
        model = client.module("model").eval()
        opt = client.optimizer([p for n, p in model.named_parameters() if self.hp.head != "frozen"
                                or not n.startswith("head.")])
        for x, y in client.batches(self.run.epochs):
            client.step(opt, F.cross_entropy(model(x), y))

    def _record_end(self, client):
        return None

    @torch.no_grad()
    def server_update(self, server, uploads):
        ps = [u.weight for u in uploads]
        params = {k: v for k, v in server.module("model").state_dict().items() if v.is_floating_point()}
        for k, v in params.items():
            v.copy_(algebra.weighted_sum(ps, [u.payload["model"][k] for u in uploads]))
        return {}

    def predict(self, client, x):
        return client.module("model").eval()(x)

    def global_predict(self, server, x):
        return server.module("model").eval()(x)
