"""The optimizer-state formats of BlockAdam, as data.

A format is a :class:`~badam_ext._C.StateSpec`: named regions, each with a dtype and a block (1: one
item per element; ``QUANT_BLOCK``: one scale per quantization block). The C++ arena allocates and lays
out every region from it; the kernels take the format as constexpr; the optimizer asks the spec for
byte counts.

==============  ========================================================================  ===========
``states``      regions                                                                   bytes/param
==============  ========================================================================  ===========
``"fp32"``      master, exp_avg, exp_avg_sq: float32                                      12
``"8bit"``      master float32; exp_avg, exp_avg_sq: uint8 codes, each with a float32      6 + 8/256
                absmax per block of 256 (``exp_avg_scale``, ``exp_avg_sq_scale``)
==============  ========================================================================  ===========

``master=False`` drops the master region (the weights themselves are updated, with stochastic
rounding for bf16): 8 and 2 + 8/256 bytes per parameter.
"""
from __future__ import annotations

import torch

from badam_ext._C import ALIGNMENT_BYTES, StateSpec

__all__ = ["ALIGNMENT_BYTES", "FP32", "QUANT_BLOCK", "STATE_FORMATS", "StateSpec", "check_states",
           "describe", "is_quantized", "state_spec", "states_entry"]

#: the state formats ``BlockAdam(states=...)`` accepts
STATE_FORMATS = ("fp32", "8bit")
#: elements per absmax scale of the 8-bit format (bitsandbytes' and torchao's block size)
QUANT_BLOCK = 256

#: the default, bit-exact format (the C++ arena's default too)
FP32: StateSpec = StateSpec.fp32()


def check_states(states: object) -> str:
    """``states`` if it names a format; a ValueError listing the formats otherwise."""
    if not isinstance(states, str) or states not in STATE_FORMATS:
        raise ValueError(f"unknown states={states!r}: choose one of {', '.join(map(repr, STATE_FORMATS))}")
    return states


def state_spec(states: str = "fp32", master: bool = True) -> StateSpec:
    """The spec of a format, with or without the fp32 master region."""
    states = check_states(states)
    if not isinstance(master, bool):
        raise TypeError(f"master must be a bool, got {type(master).__name__}")
    regions: list[tuple[str, torch.dtype, int]] = [("master", torch.float32, 1)] if master else []
    if states == "fp32":
        if master:
            return FP32
        regions += [("exp_avg", torch.float32, 1), ("exp_avg_sq", torch.float32, 1)]
    else:
        regions += [("exp_avg", torch.uint8, 1), ("exp_avg_scale", torch.float32, QUANT_BLOCK),
                    ("exp_avg_sq", torch.uint8, 1), ("exp_avg_sq_scale", torch.float32, QUANT_BLOCK)]
    return StateSpec(states if master else f"{states}-nomaster", regions)


def is_quantized(spec: StateSpec) -> bool:
    """True for a format whose moments are 8-bit codes with per-block scales."""
    return spec.has("exp_avg_scale")


def states_entry(spec: StateSpec) -> dict[str, object]:
    """The format as ``BlockAdam(states=, master=)`` names it (and ``state_dict`` records it)."""
    return {"states": "8bit" if is_quantized(spec) else "fp32", "master": spec.has("master")}


def describe(fmt: object) -> str:
    """A format (a spec, or a ``state_dict``'s entry) as people name it: ``states='8bit', master=False``."""
    entry = states_entry(fmt) if isinstance(fmt, StateSpec) else fmt
    if isinstance(entry, dict) and set(entry) == {"states", "master"}:
        return f"states={entry['states']!r}, master={entry['master']}"
    return f"an unknown format ({entry!r})"
