"""Model zoo: the five heterogeneous CNNs of the pFedLoRA family and the adapters."""

from fedbench.models.cnn import CNN, CNN_WIDTHS, ModuleSpec, cnn_spec, model_assignment  # noqa: F401
