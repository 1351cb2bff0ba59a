"""LoRA on a shared frozen backbone: layers in PEFT's anatomy, their injection, and the exact algebra
of federated aggregation (effective weights, errors)."""
