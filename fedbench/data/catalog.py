"""The datasets fedbench knows: name, classes, normalisation, default classes per client (what a dataset is,
apart from how it is loaded: ``fedbench/data/sources.py``, ``fedbench/data/shakespeare.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.errors import choice_error


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_classes_per_client: int
    torchvision_class: str | None


# Normalisation of the pFedLoRA authors' code: CIFAR-10 uses the ImageNet statistics.
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 2, "CIFAR10"),
    "cifar100": DatasetInfo("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 10, "CIFAR100"),
    "synthetic": DatasetInfo("synthetic", 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 2, None),
    # the language tier (fedbench/data/shakespeare.py): clients are (play, role), tokens are the backbone's
    "shakespeare": DatasetInfo("shakespeare", 1, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1, None),
}
TEXT_DATASETS = ("shakespeare",)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise choice_error("dataset", name, DATASETS)
    return DATASETS[name]
