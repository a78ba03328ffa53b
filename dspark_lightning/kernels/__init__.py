"""Fused kernels (torch + Triton). A leaf layer: imports torch and triton only, never other package modules.

Each kernel has a plain-torch reference with the same signature (the CPU path and the parity oracle); Triton
itself is imported lazily, on first use of a Triton backend.
"""

from .fused_block_loss import FusedBlockLossOutput, fused_block_loss
from .markov_sampling import gumbel_noise, markov_sample, markov_sample_reference
from .prefix_schedule import prefix_schedule, prefix_schedule_reference
from .vocab_ce_l1 import BACKEND_ENV, resolve_backend, triton_available, vocab_ce_l1, vocab_ce_l1_reference

__all__ = ["BACKEND_ENV", "FusedBlockLossOutput", "fused_block_loss", "gumbel_noise", "markov_sample",
           "markov_sample_reference", "prefix_schedule", "prefix_schedule_reference", "resolve_backend",
           "triton_available", "vocab_ce_l1", "vocab_ce_l1_reference"]
