"""Causal-LM backbones for the federated-LoRA family.

A language backbone declares its own frozen task head: ``own_head = True`` and ``features(x)`` returns the
next-token logits (B, T, V) of its tied LM head, so the family puts a parameter-free identity head on top
(nothing to train or send) and every method's ``head(backbone.features(x))`` is unchanged. It also declares
``task_loss(logits, y)``: the mean next-token cross-entropy over the tokens whose target is not padding.

* ``CharLM``: a small pre-norm causal transformer over a character vocabulary (``q_proj``/``k_proj``/
  ``v_proj``/``o_proj`` and ``fc1``/``fc2`` as in the ViT, learned positions, tied embedding/LM head).
* ``HFCausalLM``: any transformers causal LM (SmolLM2-135M); ``model.model.layers.*.self_attn.q_proj``
  are plain ``nn.Linear`` layers, so fedbench's ``find_targets`` finds them by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.lm import IGNORE
from fedbench.models.backbones import Attention
from fedbench.models.cnn import builder


def token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of (B, T, V) logits against (B, T) targets, padding (IGNORE) left out."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


class CausalAttention(Attention):
    """The ViT's attention (explicit matmuls, metered) with a causal mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self._split(self.q_proj(x) * self.scale)
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.float().masked_fill(mask, float("-inf")).softmax(dim=-1).to(v.dtype)
        return self.o_proj(torch.matmul(attn, v).transpose(1, 2).reshape(B, T, D))


class CharBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharLM(nn.Module):
    own_head = True

    def __init__(self, vocab: int, dim: int = 64, depth: int = 2, heads: int = 4, context: int = 128):
        super().__init__()
        self.vocab, self.context = vocab, context
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.ModuleList(CharBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.feature_dim = vocab

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab) of token ids (B, T), T <= context."""
        h = self.embed(x) + self.pos[:, :x.shape[1]]
        for b in self.blocks:
            h = b(h)
        return self.lm_head(self.norm(h))

    forward = features

    @staticmethod
    def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return token_loss(logits, y)


class HFCausalLM(nn.Module):
    """A transformers causal LM as a fedbench backbone (``model`` is the ``AutoModelForCausalLM``)."""

    own_head = True
    # the joint pass of all participants (--client-batching auto) does not pay: the tied 49,152-word head makes
    # it memory-bound on the CPU (benchmarks/batched_round.py: SmolLM2 0.61x at 10 participants)
    joint_pass_pays = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feature_dim = int(model.config.vocab_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, use_cache=False).logits

    forward = features

    @staticmethod
    def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return token_loss(logits, y)


@builder("identity-head")
def _identity_head() -> nn.Module:
    """The head of a backbone with its own (frozen) task head: no parameters, nothing trained or sent."""
    return nn.Identity()
