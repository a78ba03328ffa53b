"""Speculative decoding: the engine, verify-length policies, SPS profiling and confidence calibration."""

from .engine import SpeculativeEngine
from .policies import ConfidenceThreshold, FixedLength, PrefixScheduler, build_policy, schedule_prefix
from .records import Generation, Rounds
from .sampling import Sampling
from .sps import SpsTable

__all__ = [
    "ConfidenceThreshold", "FixedLength", "Generation", "PrefixScheduler", "Rounds", "Sampling", "SpeculativeEngine",
    "SpsTable", "build_policy", "schedule_prefix",
]
