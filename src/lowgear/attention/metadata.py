"""The one metadata object of a forward step.

The generator builds a `StepMetadata` per step and passes it down unchanged; every layer and every
attention backend reads it, none recomputes it. A step is a flat batch of T new tokens from B
sequences (prefill chunks and decode tokens mixed). Sequence s contributes q_lens[s] new tokens,
which sit at the end of its kv_lens[s] cached positions once this step has written them.

The KV cache is always addressed through block tables: a contiguous cache is the special case of
one page per sequence whose page size is max_seq_len. `slot_mapping[t]` is the flat slot
(page * page_size + offset) that new token t's keys and values go to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepMetadata:
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot for each new token's K/V
    cu_q_lens: torch.Tensor  # [B+1] int32, prefix sums of q_lens
    kv_lens: torch.Tensor  # [B] int32, context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_pages] int32, page ids (padding: 0)
    logit_indices: torch.Tensor  # [L] int64, rows of the T tokens whose logits are wanted
    page_size: int
    # Host copies, so that torch backends can slice without a device sync.
    q_lens_host: tuple[int, ...]
    kv_lens_host: tuple[int, ...]
    max_q_len: int
    max_kv_len: int
    # True when every sequence has q_len == 1 (a pure decode step).
    is_decode: bool = False
    # True for a step of engine/graphs.py (fixed shapes, captured in a CUDA graph): the model runs it on the
    # device's capturable rung, as it runs decode steps, whatever its q_lens.
    graphed: bool = False
    # What a torch rung derives from the step once and every layer reuses (sdpa's gather slots and
    # masks), keyed by what it depends on; filled on first use, never part of equality.
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.q_lens_host)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.q_lens_host))

    def to(self, device: torch.device | str) -> "StepMetadata":
        """The same metadata with its tensors on `device` (for layers split over devices)."""
        dev = torch.device(device)
        if self.positions.device == dev:
            return self
        moved = {
            name: getattr(self, name).to(dev, non_blocking=True)
            for name in ("positions", "slot_mapping", "cu_q_lens", "kv_lens", "block_tables", "logit_indices")
        }
        return StepMetadata(
            **moved,
            page_size=self.page_size,
            q_lens_host=self.q_lens_host,
            kv_lens_host=self.kv_lens_host,
            max_q_len=self.max_q_len,
            max_kv_len=self.max_kv_len,
            is_decode=self.is_decode,
            graphed=self.graphed,
        )


def token_slots(
    q_lens: list[int], kv_lens: list[int], block_tables: list[list[int]], page_size: int
) -> tuple[list[int], list[int]]:
    """Position and flat cache slot of every new token: the one formula (graph staging uses it too).

    Sequence s's q_lens[s] new tokens are its last positions kv_lens[s] - q_lens[s] .. kv_lens[s] - 1;
    position p lives at offset p % page_size of page block_tables[s][p // page_size].
    """
    positions: list[int] = []
    slots: list[int] = []
    for q, kv, table in zip(q_lens, kv_lens, block_tables):
        for p in range(kv - q, kv):
            positions.append(p)
            slots.append(table[p // page_size] * page_size + p % page_size)
    return positions, slots


def build_metadata(
    q_lens: list[int],
    kv_lens: list[int],
    block_tables: list[list[int]],
    page_size: int,
    device: torch.device | str = "cpu",
    logits: str | list[int] = "last",
) -> StepMetadata:
    """Build a step's metadata from per-sequence facts (host side, once per step).

    `logits`: "last" wants the last new token of each sequence, "all" every new token, a list the
    last logits[s] new tokens of sequence s (a speculative check wants all of its k+1).
    """
    assert len(q_lens) == len(kv_lens) == len(block_tables)
    positions, slots = token_slots(q_lens, kv_lens, block_tables, page_size)
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    if logits == "all":
        logit_rows = list(range(cu[-1]))
    elif logits == "last":
        logit_rows = [c - 1 for c in cu[1:]]
    else:
        logit_rows = [row for n, c in zip(logits, cu[1:]) for row in range(c - n, c)]
    width = max((len(t) for t in block_tables), default=1) or 1
    tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
    dev = torch.device(device)

    def t(values, dtype):
        return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

    return StepMetadata(
        positions=t(positions, torch.int64),
        slot_mapping=t(slots, torch.int64),
        cu_q_lens=t(cu, torch.int32),
        kv_lens=t(kv_lens, torch.int32),
        block_tables=t(tables, torch.int32),
        logit_indices=t(logit_rows, torch.int64),
        page_size=page_size,
        q_lens_host=tuple(q_lens),
        kv_lens_host=tuple(kv_lens),
        max_q_len=max(q_lens, default=0),
        max_kv_len=max(kv_lens, default=0),
        is_decode=all(q == 1 for q in q_lens),
    )
