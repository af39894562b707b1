"""Runs one scheduled step on one device: device inputs, the model, CUDA graphs for decode steps.

The model runner owns the model, the KV cache and the captured graphs of one tensor-parallel rank.
It turns a list of scheduled chunks into device tensors (tokens decodes first, then prefill chunks;
slot mapping; block tables; sequence lengths), runs the model and returns the logits of the rows
that sample. Pure-decode steps up to the largest captured batch replay a CUDA graph.
"""
from __future__ import annotations

import logging
import sys
import time

import numpy as np
import torch

from stepvox.kernels import default_num_splits
from stepvox.kernels.argmax import argmax_rows

from .attention_metadata import AttentionMetadata
from .config import EngineConfig, Step1Config
from .device.graphs import GraphCache
from .device.staging import StagedInputs, values_to_device
from .distributed.parallel_state import TPGroup
from .errors import ConfigError
from .kv_cache import (CALIBRATION_TOKENS, allocate_kv_cache, calibration_token_ids, kv_page_bytes,
                       kv_scales_from_absmax)
from .models.step1 import Step1ForCausalLM
from .models.step1_checkpoint import CheckpointReader
from .models.step1_dummy import DummyReader
from .scheduler import ChunkPlan

log = logging.getLogger("stepvox")

GRAPH_BATCH_SIZES = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
CPU_DEFAULT_KV_TOKENS = 64 * 1024


class _LoadProgress:
    """A one-line progress bar on stderr for weight loading (rank 0 speaks for every rank: they
    load their slices in parallel at about the same pace)."""

    def __init__(self, rank: int, size: int):
        self.enabled = rank == 0 and sys.stderr.isatty()
        self.size = size
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\rloading weights [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tensors"
                         f" ({self.size} rank{'s' if self.size > 1 else ''}, {time.perf_counter() - self.t0:.0f} s)")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _pad_tables(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    width = width or max((len(t) for t in tables), default=1) or 1
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out


class ModelRunner:
    def __init__(self, model_path: str, cfg: Step1Config, ecfg: EngineConfig, device: torch.device,
                 tp: TPGroup = TPGroup()):
        """One rank's model: `device` is this rank's, `tp` its tensor-parallel group."""
        self.cfg, self.ecfg = cfg, ecfg
        self.device, self.dtype = device, ecfg.resolve_dtype(device)
        self.max_model_len = ecfg.model_len(cfg)
        self.page_size = ecfg.page_size
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        self.tp = tp
        self.kernels = ecfg.kernels
        self.local_kv_heads = cfg.num_attention_groups // tp.size
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8

        t0 = time.perf_counter()
        # a folder's shapes are all checked before any weight is allocated; dummy weights have them by making
        reader = (DummyReader(model_path, cfg, device) if ecfg.load_format == "dummy"
                  else CheckpointReader(model_path, cfg))
        with reader:
            fp8, fp8_head = ecfg.fp8_weights(cfg)
            self.model = Step1ForCausalLM(cfg, self.dtype, device, tp, self.kernels, fused_decode=ecfg.fused_decode,
                                          gemv_max_rows=ecfg.gemv_max_rows, gemv_tiles=ecfg.gemv_tiles, fp8=fp8,
                                          fp8_lm_head=fp8_head)
            self.model.load_weights(reader, progress=_LoadProgress(tp.rank, tp.size))
        self.model.fold_norm_weights()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.load_seconds = time.perf_counter() - t0

        self.kv_dtype = ecfg.kv_dtype(self.dtype)
        self.num_pages = tp.min_int(self._decide_num_pages(), device)   # every rank holds the same pages
        self.kv_cache = allocate_kv_cache(cfg.num_hidden_layers, self.num_pages, self.local_kv_heads,
                                          self.page_size, cfg.head_dim, self.kv_dtype, device)
        fp8_kv = self.kv_dtype == torch.float8_e4m3fn
        # [layer, K/V, KV head]; the FP8 cache's scales, set by _calibrate_kv_scales
        self.kv_scales = (torch.ones(cfg.num_hidden_layers, 2, self.local_kv_heads, dtype=torch.float32, device=device)
                          if fp8_kv else None)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.model.attention_layers(), self.kv_cache)):
            layer.k_cache, layer.v_cache = k_cache, v_cache
            if fp8_kv:
                layer.k_scale, layer.v_scale = self.kv_scales[i, 0], self.kv_scales[i, 1]
        if fp8_kv:
            self._calibrate_kv_scales()
        graph_sizes = self._graph_sizes()
        pages = self.max_pages_per_seq * ecfg.max_num_seqs
        self.staging = StagedInputs(
            {torch.long: 3 * max(ecfg.max_num_batched_tokens, graph_sizes[-1]),
             torch.int32: 2 * pages + 3 * ecfg.max_num_seqs + 1}, device)
        self.use_graphs = device.type == "cuda" and not ecfg.enforce_eager
        self.graphs: GraphCache | None = None
        self.graph_sizes: list[int] = []
        if device.type == "cuda":
            self._warmup()
        if self.use_graphs:
            self._capture_graphs(graph_sizes)

    # ---------------------------------------------------------------- KV cache sizing
    def _decide_num_pages(self) -> int:
        if self.ecfg.num_kv_pages is not None:
            return self.ecfg.num_kv_pages
        per_page = kv_page_bytes(self.cfg.num_hidden_layers, self.local_kv_heads, self.page_size,
                                 self.cfg.head_dim, self.kv_dtype)
        if self.device.type != "cuda":
            tokens = min(CPU_DEFAULT_KV_TOKENS, self.max_model_len * self.ecfg.max_num_seqs)
            return max(-(-tokens // self.page_size), self.max_pages_per_seq)
        peak_activations = self._profile_peak_activation_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = self.ecfg.gpu_memory_utilization * total - (total - free) - peak_activations
        pages = int(budget // per_page)
        if pages < 1:
            raise ConfigError(f"no room for a KV cache: weights and activations leave {budget / 2**30:.2f} GiB of the "
                              f"{self.ecfg.gpu_memory_utilization:.0%} allowed; raise gpu_memory_utilization or "
                              f"lower max_num_batched_tokens")
        log.info("KV cache: %d pages of %d tokens (%.2f GiB)", pages, self.page_size, pages * per_page / 2**30)
        return pages

    @torch.inference_mode()
    def _profile_peak_activation_bytes(self) -> int:
        """Peak memory of the largest step (a prefill of max_num_batched_tokens tokens, no cache)."""
        tokens = min(self.ecfg.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(slot_mapping=None, num_prefill_tokens=tokens,
                                 prefill_cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
                                 prefill_max_len=tokens)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        hidden = self.model(ids, meta)
        self.model.compute_logits(hidden[-min(tokens, self.ecfg.max_num_seqs):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _calibrate_kv_scales(self) -> None:
        """The FP8 cache's scales from a calibration prefill (nothing is written to the cache):
        each (layer, KV head)'s largest |K| and |V|, with headroom (kv_cache.py)."""
        tokens = min(CALIBRATION_TOKENS, self.ecfg.max_num_batched_tokens, self.max_model_len)
        ids = calibration_token_ids(self.cfg.vocab_size, tokens).to(self.device)
        meta = AttentionMetadata(slot_mapping=None, num_prefill_tokens=tokens,
                                 prefill_cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
                                 prefill_max_len=tokens)
        layers = list(self.model.attention_layers())
        absmax = torch.zeros_like(self.kv_scales)
        for layer, seen in zip(layers, absmax):
            layer.kv_absmax = seen
        try:
            self.model(ids, meta)
        finally:
            for layer in layers:
                layer.kv_absmax = None
        self.kv_scales.copy_(kv_scales_from_absmax(absmax))

    @torch.inference_mode()
    def _warmup(self) -> None:
        """Compile the kernel variants of mixed steps now, not on the first requests: a step with
        decodes (split and unsplit) and prefill chunks with and without cached context. Slots are
        -1, so nothing is written to the cache."""
        dev, ps = self.device, self.page_size
        lens = [ps + 1, 2 * ps]                              # chunk lengths; the second has context
        ctx = [0, 3 * ps]
        for decodes, splits in ((1, 1), (2, 2), (2, 4)):     # the decode kernel's tile depends on the split count
            total = decodes + sum(lens)
            meta = AttentionMetadata(
                slot_mapping=torch.full((total,), -1, dtype=torch.long, device=dev), num_decode=decodes,
                decode_block_table=torch.zeros(decodes, 8, dtype=torch.int32, device=dev),
                decode_seq_lens=torch.full((decodes,), 3 * ps, dtype=torch.int32, device=dev),
                decode_num_splits=splits, decode_max_seq_len=3 * ps, num_prefill_tokens=sum(lens),
                prefill_cu_seqlens=torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=dev),
                prefill_max_len=max(lens), prefill_context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
                prefill_block_table=torch.zeros(2, 8, dtype=torch.int32, device=dev))
            hidden = self.model(torch.zeros(total, dtype=torch.long, device=dev), meta)
            argmax_rows(self.model.compute_logits_raw(hidden[-2:]), backend=self.kernels.backend)
            meta.prefill_context_lens = meta.prefill_block_table = None
            self.model(torch.zeros(total, dtype=torch.long, device=dev), meta)
        torch.cuda.synchronize(dev)

    # ---------------------------------------------------------------- inputs
    def _slots(self, table: list[int], start: int, length: int) -> list[int]:
        ps = self.page_size
        return [table[p // ps] * ps + p % ps for p in range(start, start + length)]

    def prepare(self, plans: list[ChunkPlan]):
        """Device inputs for a step: (input_ids, metadata, plan indices in token order, sample rows
        as a device index or None when every token samples). The host values go over in one staged,
        non-blocking copy per dtype (device/staging.py), so preparing an eager step never waits
        for a step launched ahead."""
        decodes = [i for i, c in enumerate(plans) if c.length == 1]
        prefills = [i for i, c in enumerate(plans) if c.length > 1]
        ids, slots = [], []
        for i in decodes + prefills:
            c = plans[i]
            ids += c.tokens
            slots += self._slots(c.block_table, c.start, c.length)
        rows, pos = [], 0
        for i in decodes + prefills:
            pos += plans[i].length
            if plans[i].samples:
                rows.append(pos - 1)
        i64, i32 = torch.long, torch.int32
        parts = {"ids": (ids, i64), "slots": (slots, i64)}
        if len(rows) != len(ids):
            parts["rows"] = (rows, i64)
        if decodes:
            lens = [plans[i].start + 1 for i in decodes]
            parts["lens"] = (lens, i32)
            parts["decode_table"] = (_pad_tables([plans[i].block_table for i in decodes]), i32)
        if prefills:
            cu = np.cumsum([0] + [plans[i].length for i in prefills])
            parts["cu"] = (cu, i32)
            if any(plans[i].start for i in prefills):
                parts["ctx"] = ([plans[i].start for i in prefills], i32)
                parts["prefill_table"] = (_pad_tables([plans[i].block_table for i in prefills]), i32)
        on_device = dict(zip(parts, self.staging.put(list(parts.values()))))
        meta = AttentionMetadata(slot_mapping=on_device["slots"], num_decode=len(decodes))
        if decodes:
            meta.decode_seq_lens = on_device["lens"]
            meta.decode_block_table = on_device["decode_table"]
            meta.decode_max_seq_len = max(lens)
            meta.decode_num_splits = default_num_splits(len(decodes), self.local_kv_heads, max(lens), self.num_sms)
        if prefills:
            meta.num_prefill_tokens = int(cu[-1])
            meta.prefill_cu_seqlens = on_device["cu"]
            meta.prefill_max_len = max(plans[i].length for i in prefills)
            meta.prefill_context_lens = on_device.get("ctx")
            meta.prefill_block_table = on_device.get("prefill_table")
        return on_device["ids"], meta, decodes + prefills, on_device.get("rows")

    # ---------------------------------------------------------------- execution
    @torch.inference_mode()
    def execute(self, plans: list[ChunkPlan], input_tokens: torch.Tensor | None = None):
        """Run the step. Returns (logits [N, V], the indices into `plans` of the N chunks that sample,
        in row order, their argmax ids [N] when the step computed them, else None). Nothing waits for
        the device. input_tokens: the plans' token ids as a device tensor [len(plans)] (every plan a
        decode planned ahead; the ids in the plans are placeholders)."""
        if input_tokens is not None and not all(c.length == 1 for c in plans):
            raise ValueError("input_tokens feeds decode steps only")
        if self.use_graphs and all(c.length == 1 for c in plans):
            size = self._graph_size(len(plans))
            if size is not None:
                return self._replay(plans, size, input_tokens)
        input_ids, meta, order, rows = self.prepare(plans)
        if input_tokens is not None:
            input_ids = input_tokens.to(device=input_ids.device, dtype=input_ids.dtype)   # decodes keep plan order
        hidden = self.model(input_ids, meta)
        sampling = [i for i in order if plans[i].samples]
        if not sampling:
            return hidden.new_empty(0, self.cfg.vocab_size, dtype=torch.float32), sampling, None
        selected = hidden if rows is None else hidden[rows]
        return self.model.compute_logits(selected), sampling, None

    # ---------------------------------------------------------------- CUDA graphs
    def _graph_sizes(self) -> list[int]:
        cap = min(self.ecfg.cuda_graph_max_batch, self.ecfg.max_num_seqs)
        sizes = [s for s in GRAPH_BATCH_SIZES if s <= cap]
        if not sizes or sizes[-1] < cap:
            sizes.append(cap)
        return sizes

    def _graph_size(self, batch: int) -> int | None:
        for s in self.graph_sizes:
            if s >= batch:
                return s
        return None

    def _graph_body(self, size: int, ids: torch.Tensor, meta: AttentionMetadata):
        logits = self.model.compute_logits_raw(self.model(ids, meta))   # model dtype
        return logits, argmax_rows(logits, backend=self.kernels.backend)

    def _graph_inputs(self, size: int):
        """A decode graph's static inputs: views of the buffers all graphs share, `io` [3, B] int64 =
        token ids, cache slots, sequence lengths, and `tables` [B, max_pages] int32."""
        meta = AttentionMetadata(
            slot_mapping=self.io[1, :size], num_decode=size, decode_block_table=self.tables[:size],
            decode_seq_lens=self.io[2, :size], decode_max_seq_len=self.max_model_len,
            decode_num_splits=default_num_splits(size, self.local_kv_heads, self.max_model_len, self.num_sms))
        return self.io[0, :size], meta

    @torch.inference_mode()
    def _capture_graphs(self, sizes: list[int]) -> None:
        """One graph per decode batch size, the biggest first (the smaller ones reuse its memory)."""
        t0 = time.perf_counter()
        biggest = sizes[-1]
        self.io = torch.zeros(3, biggest, dtype=torch.long, device=self.device)
        self.io[1].fill_(-1)
        self.tables = torch.zeros(biggest, self.max_pages_per_seq, dtype=torch.int32, device=self.device)
        self.graphs = GraphCache(self._graph_body, self._graph_inputs, self.device)
        for size in reversed(sizes):
            self.graphs.entry(size)
        self.graph_sizes = sizes
        torch.cuda.synchronize(self.device)
        self.graph_capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode graphs in %.1f s", len(sizes), self.graph_capture_seconds)

    def _replay(self, plans: list[ChunkPlan], size: int, input_tokens: torch.Tensor | None = None):
        n, ps = len(plans), self.page_size
        io = np.zeros((3, size), dtype=np.int64)
        io[1, n:] = -1
        width = max(len(c.block_table) for c in plans)
        tables = np.zeros((n, width), dtype=np.int32)
        for i, c in enumerate(plans):
            table = c.block_table
            io[0, i] = c.tokens[0]
            io[1, i] = table[c.start // ps] * ps + c.start % ps
            io[2, i] = c.start + 1
            tables[i, :len(table)] = table
        # through pinned buffers used by turns (device/staging.py): a step's inputs are staged while
        # the step launched before it may still have its copies queued
        self.staging.put_into([(io, self.io[:, :size]), (tables, self.tables[:n, :width])])
        if input_tokens is not None:
            self.io[0, :n].copy_(input_tokens)            # the previous step's samples, never on the host
        graph, _, (logits, greedy) = self.graphs.entry(size)
        graph.replay()
        # The outputs are static buffers: the next replay overwrites them, so the caller consumes them
        # (on the stream) before that.
        rows = [i for i, c in enumerate(plans) if c.samples]
        if len(rows) == n:
            return logits[:n], rows, greedy[:n]
        index = values_to_device(rows, torch.long, self.device)   # a 1-token prompt chunk that doesn't sample yet
        return logits[index], rows, greedy[index]
