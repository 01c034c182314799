"""Sampling engines behind one interface: transformers generate (default); vLLM for the cluster."""

from opdgeom.rollout.base import Rollouts, SamplingEngine
from opdgeom.rollout.hf import HFEngine

__all__ = ["Rollouts", "SamplingEngine", "HFEngine"]
