"""The language tier: causal-LM backbones (SmolLM2-135M through transformers, a character-level stand-in
pretrained in-process), their tokenisers, and Shakespeare as token windows for the engine."""

LM_BACKBONES = ("smollm2", "char-lm")
IGNORE = -100  # target id of padding: no loss, not counted
