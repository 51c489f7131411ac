"""CUDA-graph steps: capture `model.forward` once per batch-size bucket, replay it every step.

A decode step at small batch is launch-bound, not memory-bound: hundreds of small kernels, each
with Python in front of it. A pure decode step (every running job adds one token) has shapes that
depend only on the batch size, so the step is padded to a bucket (1, 2, 4, ... up to
max_batch_size) and run from a graph captured for that bucket. The same holds for a step of up to
`q_len` tokens a row (speculative decoding's check: a job's last token and its k proposals,
q_len = k + 1): rows are padded to q_len tokens and the batch to a bucket, and the logits of every
position come back, of which the caller keeps each row's real ones. Prefill and mixed steps stay eager.

What makes the step static:
- every per-step fact lives in one device staging buffer (ids, positions, slots, kv_lens, block
  tables, int64), filled through one pinned host->device copy per step and unpacked inside the graph
  (a step's ids may instead come from the device: a greedy step fed the tokens of the step before);
- block tables are padded to a fixed width (the pages of the longest possible sequence, plus
  q_len - 1 positions), and the attention backend gets a fixed `max_kv_len` bound (never the step's
  real one) and `max_q_len` = q_len, so split counts and grids do not change; kv_lens stay on the
  device and the kernels divide each sequence's real length among their programs;
- padding rows feed token 0 at position 0 of a scratch page taken from the pool while graphed
  steps run (their positions 0 .. q_len-1, writes land there), so they read and write nothing a
  job owns. In a row with fewer than q_len real tokens the padding tokens follow the real ones:
  the kernels see them at the positions after (so a real token never attends to them, the
  attention being causal), their K/V are written to the scratch page's first slot and their RoPE
  position is 0; their logits are junk and never read. The page id is data in the staging buffer,
  not part of the graph: the generator gives the page back whenever it goes idle, and a step that
  finds no free page for it simply runs eagerly. Graphs of one cache (decode and check) share it.

The graph is a thin layer over an eager static-buffer step (`DecodeGraphs(captured=False)` runs
the same staging, buffers and metadata without capturing, which is how the CPU tests run it).
Only backends that declare `capabilities.capturable` are captured (their decode and fixed-q_len
paths read no host copy of the lengths and make no host-dependent shapes; steps built here say
`graphed`, so the model runs them on its device's capturable rung); a model split over several
devices is not. The pure bookkeeping (`buckets_for`, `bucket_for`, `DecodeStaging.fill`) runs
without a GPU; the staging's positions and slots come from attention.metadata.token_slots, as
eager steps' do.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """One running job in a step: the token it feeds (or, in a step of q_len > 1, its 1..q_len tokens),
    its context length after them, its pages."""

    token: int | Sequence[int]
    kv_len: int
    pages: list[int]

    @property
    def tokens(self) -> list[int]:
        return [self.token] if isinstance(self.token, int) else list(self.token)


class DecodeStaging:
    """The host side of a graph step: one int64 buffer laid out [ids | positions | slots | kv_lens | tables].

    ids, positions and slots have `rows * q_len` entries (row r's tokens at r*q_len ..), kv_lens `rows`,
    tables rows x width; `fill` writes a step padded to `bucket` rows of q_len tokens.
    """

    def __init__(self, rows: int, width: int, page_size: int, pin: bool = False, q_len: int = 1):
        self.rows, self.width, self.page_size, self.q_len = rows, width, page_size, q_len
        # two buffers, used in turn: a step launched ahead (DynamicGenerator.iterate) fills one while
        # the copy of the step before it may still be reading the other (DecodeGraphs.run waits for a
        # buffer's last copy before filling it again: a draft's rounds are queued several ahead)
        size = rows * (3 * q_len + 1 + width)
        self._hosts = [torch.zeros(size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host = self._hosts[0]

    def flip(self) -> None:
        """Make the other host buffer the one `fill` writes (its last copy was waited for since)."""
        self.host = self._hosts[1] if self.host is self._hosts[0] else self._hosts[0]

    def sections(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids, positions, slots [rows * q_len], kv_lens [rows] and tables [rows, width], as views of `buf`."""
        t, r = self.rows * self.q_len, self.rows
        return (buf[0:t], buf[t : 2 * t], buf[2 * t : 3 * t], buf[3 * t : 3 * t + r],
                buf[3 * t + r :].view(r, self.width))

    def fill(self, rows: list[DecodeRow], bucket: int, scratch_page: int) -> None:
        assert len(rows) <= bucket <= self.rows
        ids, pos, slots, kv, tables = (t.numpy() for t in self.sections(self.host))
        ps, q = self.page_size, self.q_len
        tokens = [r.tokens for r in rows]
        assert all(1 <= len(t) <= q for t in tokens)
        positions, slot_ids = token_slots([len(t) for t in tokens], [r.kv_len for r in rows],
                                          [r.pages for r in rows], ps)
        # padding first (whole rows past len(rows), and the tail of rows with fewer than q tokens)
        ids[: bucket * q] = 0
        pos[: bucket * q] = 0
        slots[: bucket * q] = scratch_page * ps
        kv[:bucket] = q
        tables[:bucket] = 0
        tables[:bucket, 0] = scratch_page
        done = 0
        for r, (row, feed) in enumerate(zip(rows, tokens)):
            n, at = len(feed), r * q
            ids[at : at + n] = feed
            pos[at : at + n] = positions[done : done + n]
            slots[at : at + n] = slot_ids[done : done + n]
            done += n
            kv[r] = row.kv_len - n + q  # the kernels place the row's q tokens last: padding after the real ones
            w = min(len(row.pages), self.width)
            tables[r, :w] = row.pages[:w]


class ScratchPage:
    """The page padding rows write to, taken from a cache's pool only while graphed steps run."""

    def __init__(self, pool):
        self.pool = pool
        self.page: int | None = None

    def take(self) -> bool:
        if self.page is None:
            try:
                self.page = self.pool.allocate(1)[0]
            except OutOfPages:
                return False
        return True

    def release(self) -> None:
        if self.page is not None:
            self.pool.release([self.page])
            self.page = None


def disabled_reason(model, requested: bool, cache=None, paged: bool = True) -> str | None:
    """Why this model's steps (on `cache`) cannot (or should not) be captured; None when they can."""
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
    if cache is not None and (not paged or cache.contiguous):
        return "a contiguous cache has no spare page for padding rows"
    return None


def kv_bound(model, cache) -> int:
    """The longest context a graphed step of this model on this cache may have."""
    return min(cache.capacity_tokens, model.config.max_seq_len or cache.capacity_tokens)


class DecodeGraphs:
    """Steps of one model and cache from static buffers, q_len tokens a row, one graph per bucket.

    captured=False runs the same static-buffer step eagerly (no graph; the CPU tests' path);
    `replays` counts the steps run here (graph replays, or static steps when not captured).
    """

    def __init__(self, model, cache, max_batch_size: int, max_kv_len: int, q_len: int = 1,
                 scratch: ScratchPage | None = None, captured: bool = True):
        self.model, self.cache = model, cache
        self.device = model.layer_devices[0]
        backend = model.backend_for(self.device, is_decode=True)
        if not backend.capabilities.capturable:  # it would read the bound as the lengths
            raise ValueError(f"the {backend.name} attention rung cannot run static-buffer steps")
        self.buckets = buckets_for(max_batch_size)
        self.page_size = cache.page_size
        self.max_kv_len, self.q_len, self.captured = max_kv_len, q_len, captured
        self.scratch = scratch or ScratchPage(cache.pool)  # held only while graphed steps run
        self.replays = 0
        width = pages_needed(max_kv_len + q_len - 1, self.page_size)
        self.staging = DecodeStaging(self.buckets[-1], width, self.page_size, pin=self.device.type == "cuda",
                                     q_len=q_len)
        self._dev_buf = self.staging.host.to(self.device, copy=True)
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
        self._copied: dict[int, torch.cuda.Event] = {}  # id(host buffer) -> after its last copy to the device
        self._pool = None

    @property
    def scratch_page(self) -> int | None:
        return self.scratch.page

    def release_scratch(self) -> None:
        """Give the scratch page back to the pool (the generator calls this whenever it is idle)."""
        self.scratch.release()

    def release(self) -> None:
        """Give the scratch page back and drop the graphs."""
        self.release_scratch()
        self._graphs.clear()
        self._logits.clear()
        self._metas.clear()
        self._rope.clear()

    def _meta(self, b: int) -> StepMetadata:
        if b in self._metas:
            return self._metas[b]
        dev, q = self.device, self.q_len
        bound = self.max_kv_len + q - 1  # a padded row's kernel length reaches past its real one
        meta = self._metas[b] = StepMetadata(
            positions=self._pos[: b * q],
            slot_mapping=self._slots[: b * q],
            cu_q_lens=torch.arange(0, b * q + 1, q, dtype=torch.int32, device=dev),
            kv_lens=self._kv[:b],
            block_tables=self._tables[:b],
            logit_indices=torch.arange(b * q, dtype=torch.int64, device=dev),
            page_size=self.page_size,
            q_lens_host=(q,) * b,
            # A bound, not the step's lengths: capturable backends read only the device kv_lens.
            kv_lens_host=(bound,) * b,
            max_q_len=q,
            max_kv_len=bound,
            is_decode=q == 1,
            graphed=True,
        )
        return meta

    def _unpack(self) -> None:
        ids, pos, slots, kv, tables = self.staging.sections(self._dev_buf)
        self._ids.copy_(ids)
        self._pos.copy_(pos)
        self._slots.copy_(slots)
        self._kv.copy_(kv)
        self._tables.copy_(tables)

    def _step(self, b: int) -> torch.Tensor:
        """The static-buffer step of bucket b: what a graph captures, and what runs when not captured."""
        self._unpack()
        return self.model.forward(self._ids[: b * self.q_len], self._meta(b), self.cache)

    @torch.inference_mode()
    def capture(self, b: int) -> None:
        """Capture the step for bucket b (run twice eagerly first, so kernels compile and allocators settle)."""
        if not self.captured or b in self._graphs or not self.scratch.take():
            return
        torch.cuda.synchronize(self.device)  # no copy from the host buffer is still pending
        self.staging.fill([], self.buckets[-1], self.scratch.page)  # all padding rows
        self._dev_buf.copy_(self.staging.host)
        self._meta(b)  # its tensors made here, before the side stream
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[b] = self._step(b)
        self._graphs[b] = graph
        self._rope.append(self.model.rope_tables())

    def capture_all(self) -> None:
        for b in sorted(self.buckets, reverse=True):  # largest first: smaller ones reuse its pool
            self.capture(b)

    def fits(self, rows: list[DecodeRow]) -> int | None:
        """The bucket these rows run in (None: too many rows, too long a context or a row, or no scratch page)."""
        b = bucket_for(len(rows), self.buckets)
        if b is None or any(r.kv_len > self.max_kv_len or len(r.tokens) > self.q_len for r in rows):
            return None
        return b if self.scratch.take() else None

    def run(self, rows: list[DecodeRow], ids: torch.Tensor | None = None,
            counts: list[int] | None = None) -> torch.Tensor | None:
        """Logits of one step from the bucket's graph (None: it does not fit, see `fits`).

        Without `counts`: [len(rows), vocab], each row's last token's. counts[r]: the logits of row r's
        last counts[r] tokens, rows after rows (as build_metadata(logits=counts) keeps them).
        ids (int64 [len(rows)] on the device; q_len 1 only) replaces the rows' tokens: a step launched
        before the host has read the tokens it feeds. Where no row is gathered the logits are the
        graph's output buffer, overwritten by the next replay of the bucket.
        """
        b = self.fits(rows)
        if b is None:
            return None
        if b not in self._graphs:
            self.capture(b)
        self.staging.flip()
        copied = self._copied.get(id(self.staging.host))
        if copied is not None:  # the host may be steps ahead (draft rounds fed on the device): wait for that copy
            copied.synchronize()
        self.staging.fill(rows, b, self.scratch.page)
        self._dev_buf.copy_(self.staging.host, non_blocking=True)
        if self.device.type == "cuda":
            event = self._copied[id(self.staging.host)] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        if ids is not None:
            assert self.q_len == 1
            self._dev_buf[: len(rows)].copy_(ids)
        if self.captured:
            self._graphs[b].replay()
            logits = self._logits[b]
        else:
            logits = self._step(b)
        self.replays += 1
        if self.q_len == 1 and counts is None:
            return logits[: len(rows)]
        q = self.q_len
        index = [r * q + n - c for r, row in enumerate(rows) for n in [len(row.tokens)]
                 for c in range(counts[r] if counts else 1, 0, -1)]
        return logits.index_select(0, torch.tensor(index).to(logits.device, non_blocking=True))
