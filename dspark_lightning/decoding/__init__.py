"""Speculative decoding: the engine, verify-length policies, SPS profiling and confidence calibration."""

from .engine import Generation, Rounds, SpeculativeEngine
from .policies import ConfidenceThreshold, FixedLength, PrefixScheduler, build_policy, schedule_prefix
from .sps import SpsTable

__all__ = [
    "ConfidenceThreshold", "FixedLength", "Generation", "PrefixScheduler", "Rounds", "SpeculativeEngine", "SpsTable",
    "build_policy", "schedule_prefix",
]
