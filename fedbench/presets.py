"""Run presets: ``--preset common`` (the default: the benchmark's one setting for every method, a fair table)
and ``--preset reference`` (each federated-LoRA method as its official code, or its paper where no code
exists, configures it: rank, alpha and scaling convention, targets, head, local optimiser and learning
rate, server optimiser, period / density / warm-up, aggregation weights).

A preset fills the options the user leaves unset; an option given explicitly beside it wins, and the
run's label names it (``run_label``). The concrete values land in the run's config, so a run's identity
is its values plus the preset's name; ``common`` is left out of the identity (every earlier run keeps its
id). Only settings that the tiny backbones can hold and fedbench implements are set; the rest is named
in ``notes`` (shown by ``fedbench list methods``), with the settings found in neither paper nor code.

Aggregation weights: fedbench's default stays data-size weights (``--agg-weight all-splits``) for every
method, FedAvg's rule and the one FedIT, FLoRA, FlexLoRA and FederatedScope (FedSA-LoRA) use: one rule for
all keeps a common table comparable, and under unequal client sizes a 1/N mean over-weights small clients.
The reference preset sets ``--agg-weight uniform`` where the official code averages with 1/N (FedEx-LoRA,
FRLoRA; FLASC and FSLoRA divide their pseudo-gradient sum by N whatever the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedbench.errors import ConfigError

PRESETS = ("common", "reference")
HETERO_RANKS = "cycle:64,32,16,16,8,8,4,4,4,4"  # FederatedLLM's local ranks (FLoRA, its zero-padding mode)


@dataclass(frozen=True)
class Reference:
    """One method's published setting: where it comes from, the option values, and what it leaves out."""

    source: str
    values: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)


NOT_STATED = "not in paper or code as read"

REFERENCES: dict[str, Reference] = {
    "fedit": Reference(
        "code: JayZhang42/FederatedGPT-Shepherd",
        dict(rank=16, lora_alpha=16.0, targets="q_proj", optimizer="adamw", lr=3e-4, weight_decay=0.0),
        ("head: the code fine-tunes a causal LM (no classifier); the shared head is fedbench's",
         "local optimiser: Hugging Face Trainer's AdamW (weight decay 0)")),
    "ffa-lora": Reference(
        "code: Pengxin-Guo/FedSA-LoRA (freeze_A mode; no dedicated FFA-LoRA code)",
        dict(rank=8, lora_alpha=16.0, optimizer="sgd", lr=2e-2, momentum=0.0, weight_decay=0.0),
        (f"targets: {NOT_STATED} (PEFT's RoBERTa default query, value = attn)",
         "head: shared (FederatedScope averages every parameter not listed local)",
         "local optimiser: FederatedScope's SGD (momentum 0)")),
    "fedsa-lora": Reference(
        "code: Pengxin-Guo/FedSA-LoRA (GLUE config)",
        dict(rank=8, lora_alpha=16.0, head="local", optimizer="sgd", lr=2e-2, momentum=0.0, weight_decay=0.0),
        (f"targets: {NOT_STATED} (PEFT's RoBERTa default query, value = attn)",
         "local optimiser: FederatedScope's SGD (momentum 0), 10 local steps of 128 (steps not set)")),
    "hetlora": Reference(
        "paper: Cho et al. (norm weighting); ranks and scaling: ATP-1010/FederatedLLM's zero-padding mode",
        dict(ranks=HETERO_RANKS, lora_alpha=128.0, rank_scaling="constant", hetlora_weight="norm",
             optimizer="adamw", lr=3e-4, weight_decay=0.0),
        ("scaling: FederatedLLM's alpha = 2 r_k (s = 2 for every client) = alpha 128 at r_max 64, constant",
         "rank self-pruning: not implemented (its form is unverified)",
         "head: the re-implementations fine-tune causal LMs; the shared head is fedbench's")),
    "flora": Reference(
        "code: ATP-1010/FederatedLLM (stacking, heterogeneous)",
        dict(ranks=HETERO_RANKS, lora_alpha=128.0, rank_scaling="constant", targets="attn", optimizer="adamw",
             lr=3e-4, weight_decay=0.0),
        ("scaling: alpha = 2 r_k (s = 2 for every client) = alpha 128 at r_max 64, constant",
         "head: the code fine-tunes a causal LM; the shared head is fedbench's")),
    "flexlora": Reference(
        "code: alibaba/FederatedScope (FlexLoRA branch)",
        dict(ranks="cycle:8,30,128", lora_alpha=16.0, rank_scaling="per-rank", targets="attn-mlp", lr=1e-6),
        ("ranks: the code's rank types {8, 30, 200}; 200 exceeds the ViT's width 128, so 128",
         "scaling: the code merges at 16 / r_k (per-rank, alpha 16)",
         "lr: the code's default 1e-6 (sic), halved after round 15 (the halving is not reproduced)",
         f"local optimiser: {NOT_STATED} (the run's)",
         "head: the code fine-tunes a causal LM; the shared head is fedbench's")),
    "raflora": Reference(
        "paper: Wu, Hu, Min, Wang (no code found)",
        dict(rank_scaling="constant"),
        (f"rank, alpha, targets, optimiser, lr: {NOT_STATED}; the common setting",)),
    "fedex-lora": Reference(
        "code: RaghavSinghal10/fedex-lora (GLUE)",
        dict(rank=4, lora_alpha=8.0, targets="attn", head="shared", optimizer="adamw", lr=1e-3, weight_decay=0.0,
             agg_weight="uniform"),
        ("weights: the code averages with 1/N (uniform)",
         "local optimiser: Hugging Face Trainer's AdamW, warm-up ratio 0.06 (the warm-up is not reproduced)")),
    "lora-fair": Reference(
        "third-party implementation (no official code)",
        dict(rank=8, lora_alpha=32.0),
        (f"targets, optimiser, lr: {NOT_STATED}; the common setting",)),
    "fedrot-lora": Reference(
        "code: haoran-zh/FedRot-LoRA",
        dict(rank=4, lora_alpha=8.0, agg_weight="uniform"),
        ("weights: 1/N (FederatedScope fork; not verified in the code)",
         f"local steps, lr, optimiser: from the command line, {NOT_STATED}; the common setting")),
    "frlora": Reference(
        "code: IAMJackYan/FRLoRA",
        dict(rank=16, lora_alpha=32.0, head="shared", lr=2e-5, agg_weight="uniform"),
        ("weights: the code overrides sample counts with ones (uniform)",
         f"local optimiser: {NOT_STATED} (the run's)")),
    "fedloru": Reference(
        "code: haemPark/fedloru_official (ResNet-18, CIFAR-100)",
        dict(rank=128, lora_alpha=64.0, optimizer="sgd", lr=0.2, fedloru_period=50),
        ("the code adapts convolutions of a CNN; on the ViT, targets are the common setting",)),
    "flasc": Reference(
        "code: imkevinkuo/flasc (train_sparse_lora_dp.py, CIFAR-10 ViT)",
        dict(rank=16, lora_alpha=16.0, targets="attn", head="shared", optimizer="sgd", lr=1e-3, momentum=0.9,
             weight_decay=0.0, server_opt="adamw", server_lr=1e-3, server_wd=0.01, flasc_down=1.0, flasc_up=1.0,
             agg_weight="uniform"),
        ("head: the classifier is a server parameter: inside the top-k mask and the server AdamW",
         "server: torch.optim.AdamW with its default weight decay 0.01; pseudo-gradient sum / N",
         "density decay, freeze and DP options: not implemented (defaults off in the code)")),
    "fslora": Reference(
        "code: wenzhifang/Federated-Sketching-LoRA-Implementation",
        dict(rank=64, lora_alpha=1.0, rslora=True, targets="q_proj,k_proj,v_proj,fc1,fc2", head="shared",
             optimizer="adamw", lr=3e-4, weight_decay=0.01, server_opt="adamw", server_lr=3e-4, server_wd=0.01,
             agg_weight="uniform"),
        ("targets: q, k, v, up, down of Llama = q_proj, k_proj, v_proj, fc1, fc2 of the ViT",
         "head: the code fine-tunes a causal LM; a shared head is stepped by the server optimiser (mask 1)",
         "sketch sizes: the code draws k_i from a normal on [4, r]; the ratio is fedbench's --fslora-ratio")),
    "ce-lora": Reference(
        "code: 1503552056/CE-LoRA (partial)",
        dict(lr=2e-5),
        (f"rank, alpha, targets, optimiser: {NOT_STATED}; the common setting",)),
    "ilora": Reference(
        "paper: Zhou, Liu, Shang (no code found)",
        dict(optimizer="adamw", rank_scaling="constant"),
        (f"ranks, alpha, targets, lr: {NOT_STATED}; the common setting",)),
    "fl-tac": Reference(
        "code: siqi2000/FL-TAC (CIFAR/ViT setting)",
        dict(rank=4, lora_alpha=16.0, lr=1e-3),
        (f"local optimiser, targets: {NOT_STATED} (the run's)",)),
    "fedlease": Reference(
        "code: lei-wang-link/FedLEASE",
        dict(rank=4, lr=3e-3, fedlease_warmup=5, fedlease_max_clusters=4),
        (f"alpha, targets, optimiser: {NOT_STATED}; the common setting",)),
}


def reference_of(method: str) -> Reference | None:
    return REFERENCES.get(method)


def apply_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (the user's, unset options absent) with the preset's values filled in beneath them."""
    preset = values.get("preset", PRESETS[0])
    if preset not in PRESETS:
        raise ConfigError(f"--preset got {preset!r}; choose from: {', '.join(PRESETS)}")
    if preset == "common":
        return values
    method = values.get("method", "fedlora")
    ref = reference_of(method)
    if ref is None:
        have = ", ".join(REFERENCES)
        raise ConfigError(f"--preset reference with method {method}: no reference preset (the federated-LoRA "
                          f"methods have one: {have})")
    return {**ref.values, **values}


def overridden(cfg) -> list[str]:
    """The options of a reference-preset run whose value differs from the preset's (given explicitly)."""
    ref = reference_of(cfg.method) if cfg.preset == "reference" else None
    if ref is None:
        return []
    have = {**cfg.to_dict(), **cfg.method_params}
    return [k for k, v in ref.values.items() if have.get(k) != v]


def run_label(cfg, method_label: str) -> str:
    """The method's label plus, for a non-default preset, the preset and every option overriding it."""
    if cfg.preset == "common":
        return method_label
    over = overridden(cfg)
    extra = f"; overridden: {', '.join('--' + k.replace('_', '-') for k in over)}" if over else ""
    return f"{method_label} [preset {cfg.preset}{extra}]"


def describe(method: str) -> list[str]:
    """The lines ``fedbench list methods`` prints for a method's reference preset (none without one)."""
    ref = reference_of(method)
    if ref is None:
        return []
    opts = " ".join(_option(k, v) for k, v in ref.values.items())
    return [f"  follows: {ref.source}", f"  --preset reference: {opts}"] + [f"      {n}" for n in ref.notes]


def _option(name: str, value) -> str:
    opt = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return opt if value else f"--no-{opt[2:]}"
    return f"{opt} {value}"
