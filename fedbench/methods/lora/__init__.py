"""The federated-LoRA methods, one file each (spec: shared/specs/federated-lora-methods.md §3)."""
