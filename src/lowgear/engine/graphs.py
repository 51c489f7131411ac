"""CUDA-graph decode: capture `model.forward` once per batch-size bucket, replay it every decode step.

A decode step at small batch is launch-bound, not memory-bound: hundreds of small kernels, each
with Python in front of it. A pure decode step (every running job adds one token) has shapes that
depend only on the batch size, so the step is padded to a bucket (1, 2, 4, ... up to
max_batch_size) and run from a graph captured for that bucket. Prefill and mixed steps stay eager.

What makes the step static:
- every per-step fact lives in one device staging buffer (ids, positions, slots, kv_lens, block
  tables, int64), filled through one pinned host->device copy per step and unpacked inside the graph;
- block tables are padded to a fixed width (the pages of the longest possible sequence), and the
  attention backend gets a fixed `max_kv_len` bound (never the step's real one), so split counts
  and grids do not change; kv_lens stay on the device and the decode kernel divides each
  sequence's real length among the splits, so the bound costs only programs that return at once;
- padding rows decode token 0 at position 0 of a scratch page taken from the pool while graphed
  steps run (kv_len 1, writes land there), so they read and write nothing a job owns. The page id is
  data in the staging buffer, not part of the graph: the generator gives the page back whenever it
  goes idle, and a step that finds no free page for it simply runs eagerly.

Only backends that declare `capabilities.capturable` are captured (their decode path reads no host
copy of the lengths and makes no host-dependent shapes); a model split over several devices is not.
The pure bookkeeping (`buckets_for`, `bucket_for`, `DecodeStaging.fill`) runs without a GPU;
the staging's positions and slots come from attention.metadata.token_slots, as eager steps' do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.metadata import StepMetadata, token_slots
from ..cache.pages import OutOfPages, pages_needed

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def buckets_for(max_batch_size: int) -> list[int]:
    """The padded batch sizes captured for a generator: powers of two below max_batch_size, then it."""
    sizes = [b for b in BUCKETS if b < max_batch_size]
    return sizes + [max_batch_size]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n rows (None when n is larger than every bucket)."""
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass(frozen=True)
class DecodeRow:
    """One running job in a decode step: the token it feeds, its context length after it, its pages."""

    token: int
    kv_len: int
    pages: list[int]


class DecodeStaging:
    """The host side of a graph step: one int64 buffer laid out [ids | positions | slots | kv_lens | tables].

    Each section has `rows` entries (tables: rows x width); `fill` writes a step padded to `bucket`.
    """

    def __init__(self, rows: int, width: int, page_size: int, pin: bool = False):
        self.rows, self.width, self.page_size = rows, width, page_size
        # two buffers, used in turn: a step launched ahead (DynamicGenerator.iterate) fills one while
        # the copy of the step before it may still be reading the other
        self._hosts = [torch.zeros(rows * (4 + width), dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host = self._hosts[0]

    def flip(self) -> None:
        """Make the other host buffer the one `fill` writes (its last copy was waited for since)."""
        self.host = self._hosts[1] if self.host is self._hosts[0] else self._hosts[0]

    def sections(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids, positions, slots, kv_lens [rows] and tables [rows, width], as views of `buf`."""
        r = self.rows
        return buf[0:r], buf[r : 2 * r], buf[2 * r : 3 * r], buf[3 * r : 4 * r], buf[4 * r :].view(r, self.width)

    def fill(self, rows: list[DecodeRow], bucket: int, scratch_page: int) -> None:
        assert len(rows) <= bucket <= self.rows
        ids, pos, slots, kv, tables = (t.numpy() for t in self.sections(self.host))
        ps = self.page_size
        n = len(rows)
        positions, slot_ids = token_slots([1] * n, [r.kv_len for r in rows], [r.pages for r in rows], ps)
        pos[:n] = positions
        slots[:n] = slot_ids
        for r, row in enumerate(rows):
            ids[r] = row.token
            kv[r] = row.kv_len
            w = min(len(row.pages), self.width)
            tables[r, :w] = row.pages[:w]
            tables[r, w:] = 0
        pad = slice(len(rows), bucket)
        ids[pad] = 0
        pos[pad] = 0
        slots[pad] = scratch_page * ps
        kv[pad] = 1
        tables[pad] = 0
        tables[pad, 0] = scratch_page


def disabled_reason(model, requested: bool) -> str | None:
    """Why this model's decode steps cannot (or should not) be captured; None when they can."""
    if not requested:
        return "turned off (cuda_graphs=False)"
    if model.config.cuda_graphs_off():
        return "turned off (config.no_cuda_graphs / LOWGEAR_NO_CUDA_GRAPHS)"
    devices = set(model.layer_devices)
    if len(devices) != 1:
        return "the model spans several devices"
    device = next(iter(devices))
    if device.type != "cuda":
        return "not on a CUDA device"
    for layer in model.layers:  # a mixture-of-experts layer without its kernel reads expert counts on the host
        mlp = getattr(layer, "mlp", None)
        if getattr(mlp, "num_experts", None) and mlp.kernel is None:
            return f"the experts ({mlp.gate_up.qtype}) have no device kernel; their grouped torch path syncs with the host"
    backend = model.backend_for(device, is_decode=True)
    if not getattr(backend.capabilities, "capturable", False):
        return f"the {backend.name} attention backend is not capturable"
    return None


class DecodeGraphs:
    """Captured decode steps of one model and cache, one graph per bucket, and their static buffers."""

    def __init__(self, model, cache, max_batch_size: int, max_kv_len: int):
        self.model, self.cache = model, cache
        self.device = model.layer_devices[0]
        self.buckets = buckets_for(max_batch_size)
        self.page_size = cache.page_size
        self.max_kv_len = max_kv_len
        self.scratch_page: int | None = None  # held only while graphed steps run
        width = pages_needed(max_kv_len, self.page_size)
        rows = self.buckets[-1]
        self.staging = DecodeStaging(rows, width, self.page_size, pin=True)
        self._dev_buf = self.staging.host.to(self.device)
        self._ids, self._pos, self._slots, self._kv, self._tables = (
            torch.zeros_like(t) for t in self.staging.sections(self._dev_buf)
        )
        self._kv = self._kv.to(torch.int32)
        self._tables = self._tables.to(torch.int32)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._metas: dict[int, StepMetadata] = {}  # held: the graphs read their tensors
        self._rope: list = []  # held: the RoPE tables the graphs read (the model rebuilds its own for a larger
        # cache, e.g. the target as its own draft on a second cache, and would free these)
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None

    def _take_scratch(self) -> bool:
        if self.scratch_page is None:
            try:
                self.scratch_page = self.cache.pool.allocate(1)[0]
            except OutOfPages:
                return False
        return True

    def release_scratch(self) -> None:
        """Give the scratch page back to the pool (the generator calls this whenever it is idle)."""
        if self.scratch_page is not None:
            self.cache.pool.release([self.scratch_page])
            self.scratch_page = None

    def release(self) -> None:
        """Give the scratch page back and drop the graphs."""
        self.release_scratch()
        self._graphs.clear()
        self._logits.clear()
        self._metas.clear()
        self._rope.clear()

    def _meta(self, b: int) -> StepMetadata:
        dev = self.device
        return StepMetadata(
            positions=self._pos[:b],
            slot_mapping=self._slots[:b],
            cu_q_lens=torch.arange(b + 1, dtype=torch.int32, device=dev),
            kv_lens=self._kv[:b],
            block_tables=self._tables[:b],
            logit_indices=torch.arange(b, dtype=torch.int64, device=dev),
            page_size=self.page_size,
            q_lens_host=(1,) * b,
            # A bound, not the step's lengths: capturable backends read only the device kv_lens.
            kv_lens_host=(self.max_kv_len,) * b,
            max_q_len=1,
            max_kv_len=self.max_kv_len,
            is_decode=True,
        )

    def _unpack(self) -> None:
        ids, pos, slots, kv, tables = self.staging.sections(self._dev_buf)
        self._ids.copy_(ids)
        self._pos.copy_(pos)
        self._slots.copy_(slots)
        self._kv.copy_(kv)
        self._tables.copy_(tables)

    def _step(self, b: int, meta: StepMetadata) -> torch.Tensor:
        self._unpack()
        return self.model.forward(self._ids[:b], meta, self.cache)

    @torch.inference_mode()
    def capture(self, b: int) -> None:
        """Capture the step for bucket b (run twice eagerly first, so kernels compile and allocators settle)."""
        if b in self._graphs or not self._take_scratch():
            return
        self.staging.fill([], self.buckets[-1], self.scratch_page)  # all padding rows
        self._dev_buf.copy_(self.staging.host)
        meta = self._metas[b] = self._meta(b)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(b, meta)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[b] = self._step(b, meta)
        self._graphs[b] = graph
        self._rope.append(self.model.rope_tables())

    def capture_all(self) -> None:
        for b in sorted(self.buckets, reverse=True):  # largest first: smaller ones reuse its pool
            self.capture(b)

    def run(self, rows: list[DecodeRow], ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [len(rows), vocab] of one decode step, from the bucket's graph (None: no bucket fits).

        ids (int64 [len(rows)] on the device) replaces the rows' tokens: a step launched before the
        host has read the tokens it decodes. The logits are the graph's output buffer, overwritten
        by the next replay of the bucket.
        """
        b = bucket_for(len(rows), self.buckets)
        if b is None or any(r.kv_len > self.max_kv_len for r in rows) or not self._take_scratch():
            return None
        if b not in self._graphs:
            self.capture(b)
        self.staging.flip()
        self.staging.fill(rows, b, self.scratch_page)
        self._dev_buf.copy_(self.staging.host, non_blocking=True)
        if ids is not None:
            self._dev_buf[: len(rows)].copy_(ids)
        self._graphs[b].replay()
        return self._logits[b][: len(rows)]
