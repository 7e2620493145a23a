"""Optimizer-state formats (:mod:`.spec`) and the 8-bit quantization maps and codecs (:mod:`.quant`)."""
from __future__ import annotations

from .spec import (
    ALIGNMENT_BYTES,
    FP32,
    QUANT_BLOCK,
    STATE_FORMATS,
    StateSpec,
    check_states,
    describe,
    is_quantized,
    state_spec,
    states_entry,
)

__all__ = ["ALIGNMENT_BYTES", "FP32", "QUANT_BLOCK", "STATE_FORMATS", "StateSpec", "check_states",
           "describe", "is_quantized", "state_spec", "states_entry"]
