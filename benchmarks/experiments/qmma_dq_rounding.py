"""The DQ build's rounding, emulated in float64 with numpy (no GPU): weights made fp16 by one fma,
fp16(q * scale + fp16(-zero * scale)), then float32 sums and an fp16 output, against W = (q - zero) * scale.

    python benchmarks/experiments/qmma_dq_rounding.py

Prints, for 4/8-bit codes with integer (GPTQ) and float (K-quant) zeros, the relative error of the output and
of the weights (norms over a 16 x 512 output, K = 4096): what `test_dq_matches_float64`'s 2e-3 must cover.
"""

import numpy as np

rng = np.random.default_rng(0)


def trial(bits: int, gs: int, float_z: bool, m: int = 16, n: int = 512, k: int = 4096) -> tuple[float, float]:
    q = rng.integers(0, 1 << bits, (k, n))
    g = k // gs
    s = (rng.random((g, n)) * 0.01 + 0.001).astype(np.float16)
    if float_z:
        z = (rng.random((g, n)) * (1 << bits)).astype(np.float16)
    else:
        z = rng.integers(0, 1 << bits, (g, n)).astype(np.float16)
    S, Z = np.repeat(s.astype(np.float64), gs, 0), np.repeat(z.astype(np.float64), gs, 0)
    w = (q - Z) * S
    nzs = (-(z.astype(np.float32) * s.astype(np.float32))).astype(np.float16).astype(np.float64)  # in fp32
    wh = (q * S + np.repeat(nzs, gs, 0)).astype(np.float16).astype(np.float64)  # one fma, rounded once
    x = rng.standard_normal((m, k)).astype(np.float16).astype(np.float64)
    y = x @ w
    yh = (x @ wh).astype(np.float16).astype(np.float64)  # the output in fp16
    return float(np.linalg.norm(yh - y) / np.linalg.norm(y)), float(np.linalg.norm(w - wh) / np.linalg.norm(w))


if __name__ == "__main__":
    for bits, gs, fz in [(4, 128, False), (4, 128, True), (4, 32, True), (8, 16, True), (8, 16, False)]:
        out, weights = trial(bits, gs, fz)
        print(f"{bits}-bit group {gs} {'float' if fz else 'integer'} zeros: output {out:.2e}, weights {weights:.2e}")
