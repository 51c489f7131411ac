"""Where the mma.sync decode kernel's time goes: qmma.cu with parts taken out, per layer, cold weights.

Each variant edits the kernel's source before NVRTC builds it (its output is then wrong; only its time
counts): `xskip` stages no x (the staging loop runs zero times), `noepi` writes every split's sums straight to
y (no partials, no last-block sum), `nocomp` keeps the loads but no unpacking or mma (one xor of the words
keeps them live), and their combination `xskip_nocomp_noepi` streams the weights through the cp.async ring and
nothing else. `stage2` loads only x's real rows, two items in flight. Llama-3-8B's fused layers in two 4-bit
forms, 1-16 rows; the ideal is the layer's bytes at the device-to-device copy rate measured in the same run.

    python benchmarks/experiments/qmma_ablation_gpu.py --out OUT/ablation.json
    ncu --clock-control none --kernel-name qmma_kernel --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python benchmarks/experiments/qmma_ablation_gpu.py --ncu
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import gemv_cold_gpu as cold  # noqa: E402
from qmma_gpu import SHAPES, layers  # noqa: E402
from lowgear.ops.matmul import qmma as Q  # noqa: E402

BASE = Q.source()
STAGE_LOOP = "for (int idx = tid; idx < XR * nch; idx += WARPS * 32) {"
VARIANTS = ["base", "stage2", "xskip", "noepi", "xskip_noepi", "nocomp", "xskip_nocomp_noepi"]


def variant(name: str) -> str:
    s = BASE
    if "xskip" in name:
        s = s.replace(STAGE_LOOP, "for (int idx = tid; idx < 0; idx += WARPS * 32) {")
    if "stage2" in name:
        s = s.replace(STAGE_LOOP,
                      "#pragma unroll 2\n  for (int idx = tid; idx < min(M, XR) * nch; idx += WARPS * 32) {")
    if "nocomp" in name:
        a = s.index("#pragma unroll\n  for (int i = 0; i < 4; ++i) {\n#pragma unroll\n    for (int ks = 0;")
        b = s.index("  const int kend = k + SC;")
        s = s[:a] + ("  p[0][0][0] += __uint_as_float(cur.w[0] ^ cur.w[1] ^ cur.w[2] ^ cur.w[3] ^ cur.w[4] ^ cur.w[5]"
                     " ^ cur.w[6] ^ cur.w[7]);\n") + s[b:]
    if "noepi" in name:
        s = s.replace("if (nsplit == 1) {", "if (true) {")
    if name != "base" and s == BASE:
        raise RuntimeError(f"variant {name} changed nothing: qmma.cu moved on, update this script")
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ncu", action="store_true", help="one launch per case, for ncu to profile")
    ap.add_argument("--budget-s", type=float, default=380)
    a = ap.parse_args()
    cap = torch.cuda.get_device_capability()
    if a.ncu:
        for shape, bits, gs, m in [("gate_up", 4, 32, 16), ("gate_up", 4, 128, 16), ("down", 4, 32, 16)]:
            n, k = SHAPES[shape]
            L = layers(n, k, bits, gs, 1)[0]
            Q.qmma(torch.randn(m, k, device="cuda", dtype=torch.float16), L[0], L[1], L[2], bits, gs, cap)
        torch.cuda.synchronize()
        return
    bw = cold.copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "rows": []}
    t0 = time.time()
    forms = {"q4k_g32": (4, 32), "gptq4_g128": (4, 128)}
    for form, shape in itertools.product(forms, ["gate_up", "o", "down", "qkv"]):
        bits, gs = forms[form]
        n, k = SHAPES[shape]
        nbytes = n * k * bits // 8 + 4 * n * (k // gs)
        ls = layers(n, k, bits, gs, int(max(2, -(-100e6 // nbytes))))
        for m in (1, 4, 8, 16):
            if time.time() - t0 > a.budget_s:
                break
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            p = Q.launch_params(m, n, k, bits, torch.cuda.get_device_properties(0).multi_processor_count,
                                capability=cap)
            row = {"form": form, "shape": shape, "M": m, "split": p["split"], "kps": p["k_per_split"],
                   "ideal_us": round(nbytes / bw * 1e6, 2)}
            for v in VARIANTS:
                Q.source = lambda s=variant(v): s  # noqa: E731  qmma() builds from Q.source()
                row[v] = round(cold.timed([lambda L=L: Q.qmma(x, L[0], L[1], L[2], bits, gs, cap) for L in ls],
                                          rep_ms=60), 2)
            Q.source = lambda: BASE  # noqa: E731
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
