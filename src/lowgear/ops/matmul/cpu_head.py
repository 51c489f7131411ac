"""The float head of a CPU model in int4 mode, read in bfloat16, its leading logits recomputed in float32.

At 8 rows, a CPU decode step of the embedded model spent 7 ms of its 33 in the tied float32 head (49152 x
576: 113 MB read from memory every step, cold behind the layers' weights); held once more in bfloat16 the
product takes 2.2 ms. torch's CPU matmuls round a bfloat16 product's output to bfloat16 (2**-9 of a
logit, 0.06 at 30), which would tie greedy choices, so each row's TOP largest logits by that product are
computed again in float32 from the float32 weights (TOP columns gathered) and written over theirs: greedy
picks and the mass sampling draws from are the float32 head's unless more than TOP logits of a row lie
within the rounding of its largest; the rest keep the bfloat16 rounding. This runs only where the int4
kernel (cpu_int4.py) already rounds every layer's activations to bfloat16. why:
docs/decisions/022-cpu-int4-weights.md
"""

from __future__ import annotations

import torch

TOP = 32  # logits of each row recomputed in float32
MIN_ROWS = 2  # fewer rows: the float32 product (at one row it reads as fast as the bfloat16 one and needs no recompute)


def hold(module) -> bool:
    """Give a float32 CPU QuantLinear (the head) a bfloat16 copy [in, out] and this module's kernel; whether it did."""
    if module.packed or module.kernel is not None or module.weight.dtype != torch.float32 or module.device.type != "cpu":
        return False
    module.register_buffer("head_bf16", module.weight.t().to(torch.bfloat16).contiguous())
    # float32 rows contiguous again ([out, in]): the recomputed logits gather whole rows (and an embedding's
    # lookup reads them), the product no longer reads this layout
    module.weight = torch.nn.Parameter(module.weight.contiguous(), requires_grad=False)
    module.kernel = matmul
    return True


def matmul(x: torch.Tensor, module) -> torch.Tensor:
    """x [..., in] -> float32 logits [..., out]: the bfloat16 product, its TOP largest per row in float32."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    if x2.shape[0] < MIN_ROWS:
        return torch.nn.functional.linear(x2, module.weight).view(*lead, -1)
    y = torch.mm(x2.to(torch.bfloat16), module.head_bf16).float()
    top = min(TOP, y.shape[-1])
    idx = torch.topk(y, top, dim=-1).indices  # [rows, TOP]
    w = module.weight  # float32 [out, in]
    exact = torch.einsum("rk,rtk->rt", x2, w.index_select(0, idx.reshape(-1)).view(*idx.shape, -1))
    y.scatter_(1, idx, exact)
    return y.view(*lead, -1)


def extra_bytes(shape: tuple[int, ...]) -> int:
    """Bytes the bfloat16 copy of a float head of this shape takes."""
    return 2 * shape[0] * shape[1]
