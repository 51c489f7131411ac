"""Every lowgear Triton kernel of the quant / norm / rope families compiles for Volta and Turing.

Triton >= 3.3 only promises sm_80+, and a change that stops compiling for a T4 (sm_75) or a V100
(sm_70) would otherwise surface on a user's machine. `triton.compile` with an explicit GPUTarget
needs no GPU, so this runs everywhere. It runs in a subprocess with TRITON_INTERPRET unset, because
under the interpreter @triton.jit returns an InterpretedFunction that cannot be compiled.
The decode GEMV kernels must also contain no tensor-core `mma` on these targets (they use no tl.dot;
this guards against one creeping in, which Triton would lower to slow FMA loops there).
"""

import json
import os
import re
import subprocess
import sys

import pytest

TARGETS = [(75, 32), (70, 32)]
I32, F32 = "i32", "fp32"


def _specs():
    """(name, kernel, signature, constexprs, num_warps, is_gemv) for every kernel, fp16 activations."""
    from lowgear.ops import act as kernels_act, norm as kernels_norm, rope as kernels_rope
    from lowgear.ops.matmul import dequant_tile, gguf_gemv as gemv

    specs = []
    quant_args = {"x_ptr": "*fp16", "w": "*u8", "wh": "*fp16", "tab": "*fp32", "y_ptr": "*fp16", "N": I32, "K": I32,
                  "bpr": I32, "stride_xm": I32, "stride_ym": I32}
    for qtype, kernel in gemv.QUANT_KERNELS.items():
        fmt = {"FMT": qtype} if qtype in gemv.BLOCK_DOT_QTYPES else {}
        for m in (1, 4):
            nb = 1 if gemv.BLOCK_SIZES[qtype] == 256 else 8
            specs.append((f"gemv_{qtype}_m{m}", kernel, quant_args,
                          {"M": m, "M_PAD": m, "BLOCK_N": 8, "NB": nb, **fmt}, 4, True))
    from lowgear.ops.matmul import moe_gemv

    moe_args = {"x_ptr": "*fp16", "ids_ptr": "*i64", "dst_ptr": "*i64", "w": "*u8", "wh": "*fp16", "y_ptr": "*fp32",
                "part_ptr": "*fp32", "cnt_ptr": "*i32", "N": I32, "K": I32, "R": I32, "k_per_split": I32,
                "w_per_split": I32, "stride_x": I32, "stride_we": I32, "stride_wn": I32, "stride_y": I32}
    per_row = {"X_DIV": 8, "GROUPED": False, "SCATTER": False, "BLOCK_T": 1, "S_CHUNK": 16}  # gate|up at top-8
    union = {"X_DIV": 1, "GROUPED": True, "SCATTER": True, "BLOCK_T": 16, "S_CHUNK": 16}  # down, 16 rows a pass
    # the experts' GEMV of every block type per row; the union mode (the same block loop over 16 rows) for one
    # 32-weight and two 256-weight types, which bounds this test's compile time
    for qtype in gemv.BLOCK_DOT_QTYPES:
        nb = 1 if gemv.BLOCK_SIZES[qtype] == 256 else 8
        modes = (("", per_row), ("union_", union)) if qtype in UNION_COMPILED else (("", per_row),)
        for mode, consts in modes:
            specs.append((f"moe_gemv_{mode}{qtype}", moe_gemv.moe_gemv_kernel, moe_args,
                          {**consts, "FMT": qtype, "BLOCK_N": 8, "NB": nb, "BLOCK_K": 1}, 4, True))
    for mode, consts in (("", {**per_row, "X_DIV": 1}), ("union_", union)):
        specs.append((f"moe_gemv_{mode}F16", moe_gemv.moe_gemv_kernel, {**moe_args, "w": "*fp16"},
                      {**consts, "FMT": "float", "BLOCK_N": 8, "NB": 1, "BLOCK_K": 256}, 4, True))
    float_args = {"x_ptr": "*fp16", "w_ptr": "*fp16", "y_ptr": "*fp16", "N": I32, "K": I32,
                  "stride_wn": I32, "stride_xm": I32, "stride_ym": I32}
    specs.append(("gemv_F16", gemv.gemv_float_kernel, float_args,
                  {"M": 4, "M_PAD": 4, "BLOCK_N": 8, "BLOCK_K": 256}, 4, True))
    from lowgear.ops.matmul import float_gemv

    split_args = {"x_ptr": "*fp16", "w_ptr": "*fp16", "y_ptr": "*fp16", "part_ptr": "*fp32", "cnt_ptr": "*i32",
                  "N": I32, "K": I32, "k_per_split": I32, "stride_xm": I32, "stride_wn": I32}
    for m in (1, 4):
        p = float_gemv.launch_params(4096, 4096, m)
        specs.append((f"float_gemv_m{m}", float_gemv.float_gemv_kernel, split_args,
                      {"M": m, "M_PAD": m, "BLOCK_N": p["BLOCK_N"], "BLOCK_K": p["BLOCK_K"], "S_CHUNK": 4,
                       "PDL": False}, p["num_warps"], True))
    tile_args = {"w": "*u8", "wh": "*fp16", "out": "*fp16", "R": I32, "K": I32, "bpr": I32}
    for qtype, kernel in dequant_tile.DEQUANT_KERNELS.items():
        nb = 1 if gemv.BLOCK_SIZES[qtype] == 256 else 8
        specs.append((f"dequant_{qtype}", kernel, tile_args, {"BLOCK_N": 8, "NB": nb}, 4, False))
    norm_args = {"x_ptr": "*fp16", "r_ptr": "*fp16", "w_ptr": "*fp16", "out_ptr": "*fp16", "H": I32,
                 "stride_x": I32, "stride_r": I32, "stride_o": I32, "eps": F32}
    for res in (False, True):
        specs.append((f"rms_norm_res{int(res)}", kernels_norm.rms_norm_kernel, norm_args,
                      {"HAS_RESIDUAL": res, "BLOCK": 4096, "PDL": False}, 8, False))
    rope_args = {"q_ptr": "*fp16", "k_ptr": "*fp16", "pos_ptr": "*i64", "cos_ptr": "*fp32",
                 "sin_ptr": "*fp32", "HQ": I32, "HK": I32, "stride_qt": I32, "stride_qh": I32,
                 "stride_kt": I32, "stride_kh": I32, "stride_c": I32, "v_ptr": "*fp16", "kc_ptr": "*fp16",
                 "vc_ptr": "*fp16", "slot_ptr": "*i64", "stride_vt": I32, "stride_vh": I32}
    for inter in (False, True):
        specs.append((f"rope_interleaved{int(inter)}", kernels_rope.rope_kernel, rope_args,
                      {"HALF": 64, "HALF_P": 64, "D": 128, "D_P": 128, "BLOCK_HQ": 32, "BLOCK_HK": 8,
                       "INTERLEAVED": inter, "TO_CACHE": True, "PDL": False}, 4, False))
    # Phi-3's head of 96 and Phi-4-mini's 96 rotated dims of 128: masked power-of-two ranges
    for name, half, d in (("rope_phi3_d96", 48, 96), ("rope_phi4mini_rot96", 48, 128)):
        specs.append((name, kernels_rope.rope_kernel, rope_args,
                      {"HALF": half, "HALF_P": 64, "D": d, "D_P": 128, "BLOCK_HQ": 32, "BLOCK_HK": 8,
                       "INTERLEAVED": False, "TO_CACHE": True, "PDL": False}, 4, False))
    silu_args = {"x_ptr": "*fp16", "out_ptr": "*fp16", "I": I32, "stride_x": I32, "stride_o": I32}
    specs.append(("silu_mul", kernels_act.silu_mul_kernel, silu_args, {"BLOCK": 1024, "PDL": False, "GELU": False}, 4, False))
    specs.append(("gelu_mul", kernels_act.silu_mul_kernel, silu_args, {"BLOCK": 1024, "PDL": False, "GELU": True}, 4, False))
    return specs


def compile_all() -> dict:
    """{target: {kernel: {"ok": bool, "mma": int, "error": str}}}, compiled with the real backend."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _dot_probe = _dot_probe_source()
    results = {}
    for cap, warp in TARGETS:
        target = GPUTarget("cuda", cap, warp)
        per = results[f"sm_{cap}"] = {}
        for name, kernel, args, consts, warps, is_gemv in _specs():
            signature = {a: args.get(a, "constexpr") for a in kernel.arg_names}
            # the launcher marks 16-aligned pointers and multiple-of-16 ints; do as it does for a
            # typical decode call, so vectorization decisions match the real ones
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
                     if a in args and (args[a].startswith("*") or a in ("K", "bpr", "H"))}
            try:
                src = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
                ptx = triton.compile(src, target=target, options={"num_warps": warps}).asm["ptx"]
                per[name] = {"ok": True, "mma": len(re.findall(r"\b(?:wg)?mma\.", ptx)), "gemv": is_gemv}
            except Exception as exc:  # reported per kernel, so one failure does not hide others
                per[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "gemv": is_gemv}
    # the detector itself: a tl.dot kernel for sm_80 must show mma, or the checks above prove nothing
    src = ASTSource(_dot_probe, {"a": "*fp16", "b": "*fp16", "c": "*fp32"}, attrs={})
    ptx = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"num_warps": 4}).asm["ptx"]
    results["probe_sm_80_mma"] = len(re.findall(r"\b(?:wg)?mma\.", ptx))
    return results


def _dot_probe_source():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_probe(a, b, c):
        i = tl.arange(0, 32)
        x = tl.load(a + i[:, None] * 32 + i[None, :])
        y = tl.load(b + i[:, None] * 32 + i[None, :])
        tl.store(c + i[:, None] * 32 + i[None, :], tl.dot(x, y))

    return _dot_probe


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src_dir + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


UNION_COMPILED = ("Q4_0", "Q4_K", "Q6_K")


@pytest.mark.parametrize("sm", [f"sm_{cap}" for cap, _ in TARGETS])
def test_every_kernel_compiles(compiled, sm):
    failed = {name: r["error"] for name, r in compiled[sm].items() if not r["ok"]}
    assert not failed, failed
    assert len(compiled[sm]) >= 20
    assert {f"gemv_{q}_m{m}" for q in ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS") for m in (1, 4)} <= set(compiled[sm])
    assert {f"moe_gemv_{q}" for q in ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q4_1", "Q4_0", "F16")} <= set(compiled[sm])
    assert {f"moe_gemv_union_{q}" for q in (*UNION_COMPILED, "F16")} <= set(compiled[sm])


@pytest.mark.parametrize("sm", [f"sm_{cap}" for cap, _ in TARGETS])
def test_gemv_kernels_have_no_mma(compiled, sm):
    assert compiled["probe_sm_80_mma"] > 0
    with_mma = {name: r["mma"] for name, r in compiled[sm].items() if r["gemv"] and r.get("mma")}
    assert not with_mma, with_mma


if __name__ == "__main__":
    print(json.dumps(compile_all()))
