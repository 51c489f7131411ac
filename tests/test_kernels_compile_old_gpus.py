"""Every attention kernel compiles for Volta (sm_70) and Turing (sm_75), with no GPU present.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs Triton's whole pipeline
down to PTX and cubin on any machine. It runs in a subprocess with TRITON_INTERPRET removed from
the environment: under the interpreter `@triton.jit` returns interpreted functions, which cannot be
compiled. The decode kernel's FMA form (what sm_70 / sm_75 run) must contain no tensor-core `mma`;
its tl.dot form and the prefill kernel compiled for sm_80+ must contain some, which also shows the
check can see them.
"""

from __future__ import annotations

import pytest
from helpers import compiled_results

pytest.importorskip("triton")


SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from lowgear.ops.attention import paged_decode as D, paged_prefill as P
assert not D.INTERPRETED and not P.INTERPRETED

INT_PTRS = {"block_tables_ptr", "kv_lens_ptr", "cu_q_lens_ptr"}
FP32_PTRS = {"part_o_ptr", "part_lse_ptr", "k_scale_ptr", "v_scale_ptr"}
# a quantized cache's codes as kv_operands passes them (QUANT 1 int8; 2 e4m3 and 3 int4 as bytes)
CODE_PTRS = {"k_cache_ptr", "v_cache_ptr"}
CODES = {1: "*i8", 2: "*u8", 3: "*u8"}

def signature(kernel, dtype, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT_PTRS:
            sig[name] = "*i32"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in CODE_PTRS and constexprs.get("QUANT"):
            sig[name] = CODES[constexprs["QUANT"]]
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in ("scale_log2", "softcap_log2"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig

def decode(group, head_dim, splits, dot=False, split_d=None, d_vec=8, softcap=False, quant=0):
    # the constexprs paged_decode passes: by default the FMA form it launches with this Triton
    # (a quantized cache: 16 codes a thread, its storage being bytes)
    split_d = 0 if dot else D.fma_form()[0] if split_d is None else split_d
    block_n = D.DOT_BLOCK_N if dot else D.FMA_BLOCK_N if split_d else D.block_n_for(group, head_dim)
    return dict(GROUP=group, GROUP_P=max(16 if dot else 1, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                HEAD_DIM_P=head_dim, PAGE_SIZE=256, BLOCK_N=block_n, NUM_SPLITS=splits, DIRECT=splits == 1,
                WHILE_LOOP=False, DOT=dot, PDL=False, SPLIT_D=split_d, D_VEC=16 if quant else d_vec,
                SOFTCAP=softcap, QUANT=quant)

def aligned(kernel, sig):
    # What a launch specializes for fp16 head_dim-128 caches: 16-byte aligned pointers and strides
    # divisible by 16 elements (the block table's row stride need not be). Without it a thread loads
    # one element at a time and Triton's coalescing lays the split-D form's keys out differently.
    # (nor the scales' token stride: kv_heads, e.g. 8)
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or (name.startswith("stride") and name not in ("stride_bt", "stride_st"))}

def reduce(head_dim, splits):
    return dict(HEAD_DIM=head_dim, HEAD_DIM_P=head_dim, NUM_SPLITS=splits, NUM_SPLITS_P=triton.next_power_of_2(splits),
                PDL=False)

def prefill(group, head_dim, ieee, softcap=False):
    block_m, block_n = P.blocks_for(head_dim, interpreted=False)
    return dict(GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim, PAGE_SIZE=256, BLOCK_M=block_m,
                BLOCK_N=block_n, IEEE=ieee, WHILE_LOOP=False, SOFTCAP=softcap)

CASES = []
for arch in (70, 75):
    CASES += [
        ("decode", D.paged_decode_kernel, arch, "fp16", decode(4, 128, 8)),
        ("decode_direct", D.paged_decode_kernel, arch, "fp16", decode(1, 64, 1)),
        ("decode_reduce", D.paged_decode_reduce_kernel, arch, "fp16", reduce(128, 8)),
        ("prefill", P.paged_prefill_kernel, arch, "fp16", prefill(4, 128, False)),
        # Gemma: head_dim 256, soft-capped scores (gemma2), as paged_decode / paged_prefill launch them
        ("decode_256", D.paged_decode_kernel, arch, "fp16", decode(2, 256, 8, softcap=True)),
        ("decode_direct_256", D.paged_decode_kernel, arch, "fp16", decode(2, 256, 1, softcap=True)),
        ("decode_reduce_256", D.paged_decode_reduce_kernel, arch, "fp16", reduce(256, 8)),
        ("prefill_256", P.paged_prefill_kernel, arch, "fp16", prefill(2, 256, False, softcap=True)),
    ]
    # the whole-warp FMA form and the split-D form as paged_decode launches them, to count shuffles
    CASES += [
        ("decode_aligned", D.paged_decode_kernel, arch, "fp16", decode(4, 128, 8, split_d=0)),
        ("decode_split4", D.paged_decode_kernel, arch, "fp16", decode(4, 128, 8, split_d=4)),
        ("decode_split8", D.paged_decode_kernel, arch, "fp16", decode(4, 128, 8, split_d=8)),
    ]
    # a quantized cache (int8, fp8_e4m3, int4 codes): the split-D form (Triton 3.6's default), and the
    # whole-warp form's direct launch (the other versions' default) with int4's nibbles
    CASES += [(f"decode_q{quant}", D.paged_decode_kernel, arch, "fp16", decode(4, 128, 8, split_d=4, quant=quant))
              for quant in (1, 2, 3)]
    CASES += [("decode_q3_direct", D.paged_decode_kernel, arch, "fp16", decode(4, 128, 1, split_d=0, quant=3))]
CASES += [
    ("decode", D.paged_decode_kernel, 75, "fp32", decode(8, 128, 4, d_vec=4)),
    ("prefill", P.paged_prefill_kernel, 75, "fp32", prefill(1, 64, True)),
    ("prefill", P.paged_prefill_kernel, 80, "fp16", prefill(4, 128, False)),
    ("decode_dot", D.paged_decode_kernel, 80, "fp16", decode(4, 128, 8, dot=True)),
    ("decode_dot", D.paged_decode_kernel, 90, "fp16", decode(4, 128, 1, dot=True)),
]
CASES += [(f"decode_dot_q{quant}", D.paged_decode_kernel, 80, "fp16", decode(4, 128, 8, dot=True, quant=quant))
          for quant in (1, 2, 3)]
results = []
for name, kernel, arch, dtype, constexprs in CASES:
    sig = signature(kernel, dtype, constexprs)
    # aligned, one warp (NUM_WARPS)
    as_launched = name in ("decode_aligned", "decode_split4", "decode_split8", "decode_256", "decode_direct_256",
                           "decode_q1", "decode_q2", "decode_q3", "decode_q3_direct")
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                                    attrs=aligned(kernel, sig) if as_launched else None)
    options = ({"num_warps": D.NUM_WARPS} if as_launched
               else {"num_warps": 4, "num_stages": 2} if name == "prefill_256" else {})  # paged_prefill's launch
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    results.append(dict(name=name, arch=arch, dtype=dtype, mma=len(re.findall(r"\bmma\.", ptx)),
                        fma=len(re.findall(r"\bfma\.", ptx)), shfl=len(re.findall(r"\bshfl\.sync", ptx)),
                        shared=compiled.metadata.shared, cubin=len(compiled.asm["cubin"])))
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compiled_results(SCRIPT, timeout=300)


def paged_decode():
    from lowgear.ops.attention import paged_decode

    return paged_decode


def find(results, name, arch, dtype="fp16"):
    return next(r for r in results if (r["name"], r["arch"], r["dtype"]) == (name, arch, dtype))


@pytest.mark.parametrize("arch", [70, 75])
@pytest.mark.parametrize("name", ["decode", "decode_direct", "decode_reduce", "prefill", "decode_256",
                                  "decode_direct_256", "decode_reduce_256", "prefill_256"])
def test_kernel_compiles_for_old_gpus(compiled, name, arch):
    r = find(compiled, name, arch)
    assert r["cubin"] > 0
    # T4 (sm_75) gives a block at most 64 KiB of shared memory; V100 (sm_70) 96 KiB.
    assert r["shared"] <= (64 if arch == 75 else 96) * 1024


@pytest.mark.parametrize("arch,dtype", [(70, "fp16"), (75, "fp16"), (75, "fp32")])
def test_decode_kernel_has_no_tensor_core_mma(compiled, arch, dtype):
    """DESIGN: decode kernels avoid tl.dot, so they are plain loads and FMAs on every GPU."""
    r = find(compiled, "decode", arch, dtype)
    assert r["mma"] == 0
    assert r["fma"] > 0
    assert find(compiled, "decode_direct", arch if dtype == "fp16" else 75)["mma"] == 0


def test_prefill_on_sm80_uses_mma_so_the_check_can_see_it(compiled):
    assert find(compiled, "prefill", 80)["mma"] > 0
    # and below sm_80 tl.dot becomes FMAs: why prefill prefers sdpa there
    assert find(compiled, "prefill", 75)["mma"] == 0


def test_fp32_prefill_compiles_with_ieee_dot(compiled):
    r = find(compiled, "prefill", 75, "fp32")
    assert r["cubin"] > 0 and r["shared"] <= 64 * 1024


def test_decode_dot_form_is_tensor_core_mma_on_sm80(compiled):
    """The decode kernel's tl.dot form (DOT=True) is what the triton rung runs on sm_80+ for fp16 /
    bf16 (attention/triton.py routes it there only); old GPUs compile the FMA form checked above."""
    for arch in (80, 90):
        r = find(compiled, "decode_dot", arch)
        assert r["mma"] > 0 and r["shared"] <= 96 * 1024, r


@pytest.mark.parametrize("arch", [70, 75])
@pytest.mark.parametrize("split_d", [4, 8])
def test_split_d_form_compiles_without_mma_and_with_fewer_shuffles(compiled, arch, split_d):
    """The split-D FMA form (paged_decode's split_d) on V100 / T4: plain FMAs, shared memory within
    their limits, and fewer warp shuffles than the whole-warp FMA form, which sums every score over
    all 32 lanes (_decode_block's docstring): the point of the form."""
    r, whole = find(compiled, f"decode_split{split_d}", arch), find(compiled, "decode_aligned", arch)
    assert r["cubin"] > 0 and r["mma"] == 0 and r["fma"] > 0, r
    assert r["shared"] <= (64 if arch == 75 else 96) * 1024, r
    assert whole["mma"] == 0 and whole["shfl"] > 0, whole
    # where paged_decode launches the split-D form by default (D.fma_form, by Triton version) it must
    # have fewer than half the shuffles; a Triton that lays it out worse must keep the whole-warp form
    fewer = r["shfl"] < whole["shfl"] / 2
    D = paged_decode()
    assert fewer or D.fma_form()[0] == 0, (r, whole)
    if D.triton_version() == (3, 6):  # the version the form was measured with: it is the default there
        assert fewer and D.fma_form()[0] == 4, (r, whole)


@pytest.mark.parametrize("arch", [70, 75])
@pytest.mark.parametrize("quant", [1, 2, 3], ids=["int8", "fp8_e4m3", "int4"])
def test_quantized_decode_compiles_for_old_gpus_without_mma(compiled, arch, quant):
    """The decode kernel over a quantized cache (QUANT: the codes decoded as tiles load, fp8 from its
    bits with integer ops, so no FP8 instruction is needed) in the FMA forms V100 / T4 run (split-D,
    and int4 in the whole-warp form's direct launch): plain FMAs, no tensor-core mma, shared memory
    within their limits."""
    names = [f"decode_q{quant}"] + (["decode_q3_direct"] if quant == 3 else [])
    for r in (find(compiled, name, arch) for name in names):
        assert r["cubin"] > 0 and r["mma"] == 0 and r["fma"] > 0, r
        assert r["shared"] <= (64 if arch == 75 else 96) * 1024, r


@pytest.mark.parametrize("quant", [1, 2, 3], ids=["int8", "fp8_e4m3", "int4"])
def test_quantized_decode_dot_form_is_tensor_core_mma_on_sm80(compiled, quant):
    """On sm_80+ a quantized cache's decode takes the tl.dot form too (fp16 q, the codes' tiles in fp16)."""
    r = find(compiled, f"decode_dot_q{quant}", 80)
    assert r["mma"] > 0 and r["shared"] <= 96 * 1024, r
