"""The whole training step's memory on one GPU: a loss without full logits, BAdam-aware checkpoint
offload to host memory, and a planner that predicts a step's peak from a model config.

    from badam_ext import apply_memory_savings, plan_memory
    savings = apply_memory_savings(model)          # fused loss on; offload when the plan says so
    plan = plan_memory("path/config.json", batch_size=1, seq_len=16384, budget_gib=23)
"""
from .loss import causal_lm_loss, fused_linear_cross_entropy
from .offload import CheckpointOffloader
from .planner import MemoryPlan, plan_memory
from .savings import MemorySavings, apply_memory_savings

__all__ = ["apply_memory_savings", "MemorySavings", "plan_memory", "MemoryPlan", "CheckpointOffloader",
           "causal_lm_loss", "fused_linear_cross_entropy"]
