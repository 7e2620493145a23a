"""Code generation of the kernels for an H100 (sm_90), checked without a GPU: compiled in a
subprocess that does not use the interpreter, with the ptxas that ships in the triton wheel.

Guards the properties the bandwidth depends on: 16-byte vector loads and stores in the full-chunk
path, one register layout (no layout conversion through shared memory), no local-memory spills,
IEEE division / square root and no fused multiply-add in the fp32 AdamW step (the 8-bit step's
weight step is approximate by design), the L2-only loads of both steps, the 8-bit step's codebook
reads in inline PTX, its register cap and its L2 prefetch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_COMPILE = r"""
import inspect, json, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from badam_ext.kernels import adamw, switch_load, norm
from badam_ext.kernels.launch_config import FUSED_STEP_8BIT, MEASURED
h200_8bit = MEASURED["H200"][FUSED_STEP_8BIT]

def _constant(ptx, reg):
    found = re.search(r"mov\.b32\s+" + re.escape(reg) + r", (\d+);", ptx)
    return int(found.group(1)) if found else -1

def build(kernel, types, constexprs, **options):
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: types.get(p, "constexpr") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if signature[p].startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, **options})
    ptx = compiled.asm["ptx"]
    return {
        "v4_loads": len(re.findall(r"ld\.global[\w:.]*\.v4\.b32", ptx)),
        "v2_loads": len(re.findall(r"ld\.global[\w:.]*\.v2\.b32", ptx)),
        "v4_stores": len(re.findall(r"st\.global[\w:.]*\.v4\.b32", ptx)),
        "v2_stores": len(re.findall(r"st\.global[\w:.]*\.v2\.b32", ptx)),
        "shared": compiled.metadata.shared,
        "local": len(re.findall(r"\.local", ptx)),
        "sqrt_rn": len(re.findall(r"sqrt\.rn\.f32", ptx)),
        "sqrt_approx": len(re.findall(r"sqrt\.approx", ptx)),
        "div_rn": len(re.findall(r"div\.rn\.f32", ptx)),
        "div_approx": len(re.findall(r"div\.(approx|full)", ptx)),
        "div_full": len(re.findall(r"div\.full", ptx)),
        "fma": len(re.findall(r"fma\.rn\.f32", ptx)),
        "maxnreg": [int(n) for n in re.findall(r"\.maxnreg\s+(\d+)", ptx)],
        "asm_lookups": len(re.findall(r"ld\.global\.nc\.b32", ptx)),
        "cg_loads": len(re.findall(r"ld\.global\.cg", ptx)),
        "l2_prefetches": len(re.findall(r"cp\.async\.bulk\.prefetch\.L2\.global", ptx)),
        # each prefetch by the program's first thread, from its address rounded down to 16 bytes
        "l2_prefetches_guarded": len(re.findall(r"and\.b64 a, %rd\d+, -16; @first cp\.async\.bulk\.prefetch", ptx)),
        # the full chunk's stores in program order: "w" for the master's and weight's vectors, "c" for the codes
        "full_chunk_stores": "".join("c" if width == "b32" else "w" for width in
                                     re.findall(r"^\s*st\.global(?:\.\w+)*?\.(v4\.b32|v2\.b32|b32) ", ptx, re.M)),
        "l2_prefetch_bytes": sorted(_constant(ptx, reg) for reg in
                                    re.findall(r"cp\.async\.bulk\.prefetch\.L2\.global \[a\], (%r\d+);", ptx)),
    }

tables = dict(meta_ptr="*i64", chunk_ptr="*i32", grad_table_ptr="*i64")
arena = dict(master_ptr="*fp32", exp_avg_ptr="*fp32", exp_avg_sq_ptr="*fp32")
unused = dict(exp_avg_scale_ptr="*fp32", exp_avg_sq_scale_ptr="*fp32", m_map_ptr="*fp32", v_map_ptr="*fp32")
arena8 = dict(master_ptr="*fp32", exp_avg_ptr="*u8", exp_avg_sq_ptr="*u8", exp_avg_scale_ptr="*fp32",
              exp_avg_sq_scale_ptr="*fp32", m_map_ptr="*i32", v_map_ptr="*i32")
fp32_state = dict(HAS_MASTER=True, QUANT=False, QBLOCK=256, PREFETCH=0)
scalars = dict(state_ptr="*fp64", grad_scale_ptr="*fp32", found_inf_ptr="*fp32", lr="fp32", decay_factor="fp32",
               beta2="fp32", one_minus_beta1="fp32", one_minus_beta2="fp32", eps="fp32", seed_lo="i32", seed_hi="i32")
out = {
    "adamw": build(adamw._fused_adamw_kernel, {**tables, **arena, **unused, **scalars},
                   dict(W_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, W_ALIGN=8, G_ALIGN=8, HAS_SCALE=True,
                        HAS_FOUND_INF=True, STOCHASTIC=False, BLOCK=2048, **fp32_state), enable_fp_fusion=False),
    "adamw8": build(adamw._fused_adamw_kernel, {**tables, **arena8, **scalars},
                    dict(W_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, W_ALIGN=8, G_ALIGN=8, HAS_SCALE=True,
                         HAS_FOUND_INF=True, STOCHASTIC=False, BLOCK=2048, HAS_MASTER=True, QUANT=True, QBLOCK=256,
                         PREFETCH=0), enable_fp_fusion=False),
    "adamw8_h200": build(adamw._fused_adamw_kernel, {**tables, **arena8, **scalars},
                         dict(W_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, W_ALIGN=8, G_ALIGN=8, HAS_SCALE=False,
                              HAS_FOUND_INF=False, STOCHASTIC=False, BLOCK=h200_8bit.block_size, HAS_MASTER=True,
                              QUANT=True, QBLOCK=256, PREFETCH=h200_8bit.prefetch), enable_fp_fusion=False,
                         num_warps=h200_8bit.num_warps,
                         maxnreg=h200_8bit.max_registers),
    "adamw8_nomaster_sr": build(adamw._fused_adamw_kernel, {**tables, **arena8, **scalars},
                                dict(W_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, W_ALIGN=8, G_ALIGN=8, HAS_SCALE=False,
                                     HAS_FOUND_INF=False, STOCHASTIC=True, BLOCK=2048, HAS_MASTER=False, QUANT=True,
                                     QBLOCK=256, PREFETCH=4), enable_fp_fusion=False),
    "load8": build(switch_load._block_load_kernel, {**tables, **arena8, "num_chunks": "i64"},
                   dict(W_DTYPE=tl.bfloat16, W_ALIGN=8, BLOCK=2048, CHUNKS=1, HAS_MASTER=True, QUANT=True,
                        M_ZERO=127, V_ZERO=0, QBLOCK=256)),
    # the 8-bit tables of an H200 (256-element chunks), two chunks per load program
    "load8_chunks": build(switch_load._block_load_kernel, {**tables, **arena8, "num_chunks": "i64"},
                          dict(W_DTYPE=tl.bfloat16, W_ALIGN=8, BLOCK=256, CHUNKS=2, HAS_MASTER=True, QUANT=True,
                               M_ZERO=127, V_ZERO=0, QBLOCK=256), num_warps=1),
    "load": build(switch_load._block_load_kernel, {**tables, **arena, "exp_avg_scale_ptr": "*fp32",
                                                   "exp_avg_sq_scale_ptr": "*fp32", "num_chunks": "i64"},
                  dict(W_DTYPE=tl.bfloat16, W_ALIGN=8, BLOCK=2048, CHUNKS=1, HAS_MASTER=True, QUANT=False,
                       M_ZERO=127, V_ZERO=0, QBLOCK=256)),
    "norm": build(norm._grad_sq_norm_kernel, {**tables, "partials_ptr": "*fp32", "num_chunks": "i64"},
                  dict(G_DTYPE=tl.bfloat16, G_ALIGN=16, BLOCK=512, CHUNKS=4), num_warps=2),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def codegen() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such file" in proc.stderr):
            pytest.skip("this triton install has no ptxas to compile for sm_90")
        raise AssertionError(f"compiling the kernels for sm_90 failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_step_kernel_vectorizes_and_stays_in_registers(codegen):
    k = codegen["adamw"]
    # full-chunk path, 8 fp32 elements per thread: two 16-byte vectors for each of master, m, v
    assert k["v4_loads"] >= 6 and k["v4_stores"] >= 6, k
    # bf16 gradient and weight: 8-byte vectors (4 elements), the same layout as the fp32 streams
    assert k["v2_loads"] >= 2 and k["v2_stores"] >= 2, k
    assert k["shared"] == 0, f"layout conversion through shared memory: {k}"
    assert k["local"] == 0, f"local-memory spills: {k}"
    # the streams are read once: L2 only (.cg), both paths (full chunk and masked tail)
    assert k["cg_loads"] >= 8, f"the step's loads should bypass L1: {k}"


def test_step_kernel_uses_ieee_arithmetic(codegen):
    k = codegen["adamw"]
    assert k["sqrt_rn"] > 0 and k["sqrt_approx"] == 0, k
    assert k["div_rn"] > 0 and k["div_approx"] == 0, k
    assert k["fma"] == 0, f"fused multiply-adds would break bit parity with torch: {k}"


def test_switch_and_norm_kernels_vectorize(codegen):
    load, norm = codegen["load"], codegen["norm"]
    assert load["v4_stores"] >= 6 and load["v2_loads"] >= 2 and load["shared"] == 0, load
    assert norm["v4_loads"] >= 1 and norm["local"] == 0, norm


def test_8bit_step_kernel_stays_in_registers_with_approximate_weight_step(codegen):
    """The 8-bit step: no spills; the weight's step by approximate square root and the
    reciprocal-and-multiply division (``div.approx``, not the longer ``div.full``), IEEE division
    only for the per-block inverse absmax the codes depend on; no fused multiply-add (m and v, hence
    the codes, keep parity with the torch twin). Its throughput is measured by
    bench/bench_states.py on the GPU."""
    k = codegen["adamw8"]
    assert k["local"] == 0, f"local-memory spills: {k}"
    assert k["sqrt_rn"] == 0 and k["sqrt_approx"] > 0 and k["div_approx"] > 0 and k["div_full"] == 0, k
    assert k["div_rn"] > 0, f"the inverse absmax of the encoder must stay IEEE: {k}"
    assert k["fma"] == 0, k
    assert k["v4_loads"] >= 2, f"the fp32 master should still load as 16-byte vectors: {k}"
    # one register layout for the tile (only the per-block absmax rows move through shared memory);
    # the codebooks are read by inline PTX, which keeps the tile's layout on triton 3.6 too
    assert k["shared"] <= 256, f"layout conversion of the tile through shared memory: {k}"
    assert k["asm_lookups"] >= 4, f"codebook reads should be elementwise inline PTX loads: {k}"
    # grad, master, codes and absmax of m and v, in both paths: L2 only, leaving L1 to the gathers
    for name in ("adamw8", "adamw8_h200", "adamw8_nomaster_sr"):
        assert codegen[name]["cg_loads"] >= 12, f"{name}: the 8-bit step's streams should bypass L1: {codegen[name]}"


def test_compact_format_kernels_compile_without_spills(codegen):
    """No master with stochastic rounding, and the 8-bit block load: they compile for sm_90 and stay
    in registers."""
    for name in ("adamw8_nomaster_sr", "load8", "load8_chunks"):
        assert codegen[name]["local"] == 0, f"{name}: local-memory spills: {codegen[name]}"
    nomaster = codegen["adamw8_nomaster_sr"]
    assert nomaster["sqrt_rn"] == 0 and nomaster["div_approx"] > 0 and nomaster["div_full"] == 0, nomaster
    assert nomaster["fma"] == 0, nomaster
    assert codegen["load8"]["shared"] == 0 and codegen["load8"]["v4_stores"] >= 2, codegen["load8"]
    # two chunks as one tile: 16-byte master stores in the one-tensor path, no layout conversion
    assert codegen["load8_chunks"]["shared"] == 0 and codegen["load8_chunks"]["v4_stores"] >= 2, codegen["load8_chunks"]


def test_8bit_step_compiles_under_the_h200_register_cap(codegen):
    """The H200's 8-bit entry (256 x 1, at most 64 registers, an L2 prefetch) compiles, with its cap as ``.maxnreg``
    (that the launcher passes the tables' cap is tests/test_kernels_8bit.py's launch test)."""
    from badam_ext.kernels.launch_config import FUSED_STEP_8BIT, MEASURED

    k = codegen["adamw8_h200"]
    assert k["maxnreg"] == [MEASURED["H200"][FUSED_STEP_8BIT].max_registers] == [64], k
    assert codegen["adamw8"]["maxnreg"] == [], "an uncapped launch must not carry a cap"


def test_8bit_step_stores_the_weight_before_the_codes(codegen):
    """The master and weight are stored before the encoders run, so their registers are free for the
    encoders (with them live, two values a thread spilled at 64 registers: 0.907 ms against 0.875 on
    an H200, bench/RESULTS.md round 12)."""
    stores = codegen["adamw8_h200"]["full_chunk_stores"]
    assert stores.count("w") >= 3 and stores.count("c") >= 2, stores
    assert stores == "w" * stores.count("w") + "c" * stores.count("c"), f"a code stored before the weight: {stores}"


def test_8bit_step_prefetches_the_chunk_ahead_into_l2(codegen):
    """With a prefetch distance the step asks L2 for each stream the program that far ahead reads
    (grad, master or weight, m codes, v codes: four bulk prefetches); without one it asks for none."""
    from badam_ext.kernels.launch_config import FUSED_STEP_8BIT, MEASURED

    assert MEASURED["H200"][FUSED_STEP_8BIT].prefetch > 0
    h200, nomaster = codegen["adamw8_h200"], codegen["adamw8_nomaster_sr"]
    assert h200["l2_prefetches"] == h200["l2_prefetches_guarded"] == 4, h200
    # 256 elements: m and v codes 256 bytes each, bf16 grad 512, fp32 master 1024
    assert h200["l2_prefetch_bytes"] == [256, 256, 512, 1024], h200
    # no master, 2048 elements: codes 2048 bytes each, bf16 grad and bf16 weight 4096
    assert nomaster["l2_prefetches"] == nomaster["l2_prefetches_guarded"] == 4, nomaster
    assert nomaster["l2_prefetch_bytes"] == [2048, 2048, 4096, 4096], nomaster
    assert codegen["adamw8"]["l2_prefetches"] == 0 and codegen["adamw"]["l2_prefetches"] == 0
