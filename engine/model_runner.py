"""Runs one scheduled step on one device: device inputs, the model, CUDA graphs.

The model runner owns the model, the KV cache and the captured graphs of one tensor-parallel rank.
It turns a list of scheduled chunks into device tensors (tokens decodes first, then prefill chunks;
slot mapping; block tables; sequence lengths), runs the model and returns the logits of the rows
that sample. Pure-decode steps up to the largest captured batch replay a CUDA graph.

A step with prefill chunks (`split_mixed_steps`) runs as parts that are each a graph: the decodes
replay their batch's decode graph, and every prefill chunk replays the prefill graph of its length
bucket (one chunk, padded at its end: causal attention keeps the padding out of the real rows, and
the padding's cache slots are -1). Sequences never read each other's rows, so the parts compute
what one joint step computes, while an arrival's prefill costs a few graph launches instead of a
host-bound eager step for everybody. Without graphs (CPU, ranks sharing a GPU) the same parts run
their bodies eagerly on the same static buffers.
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
from .device.block_tables import DeviceBlockTables
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
PREFILL_BUCKET_MIN = 16           # prefill graphs: one per power of two from here to the step's token budget
CPU_DEFAULT_KV_TOKENS = 64 * 1024
SHARED_RANK_OVERHEAD = 1 << 30     # a rank's CUDA context and all-reduce buffers, beside what torch holds


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
        self.shares_device = tp.size > 1 and ecfg.tensor_parallel_share_device
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

        # ranks sharing a GPU meet in gloo over host copies, which a graph cannot capture
        self.use_graphs = device.type == "cuda" and not ecfg.enforce_eager and not self.shares_device
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
        # sizes: EngineConfig.buffer_bytes
        self.staging = StagedInputs(
            {torch.long: 3 * max(ecfg.max_num_batched_tokens, graph_sizes[-1]),
             torch.int32: 3 * ecfg.max_num_seqs + 1}, device)
        self.prefill_buckets = self._prefill_buckets() if ecfg.split_mixed_steps else []
        # a step's prefill chunks, padded to their buckets (ids, slots, sampled row), and their
        # contexts: one staged copy per step, apart from the decodes' (one per step each)
        self.prefill_staging = StagedInputs(
            {torch.long: 4 * ecfg.max_num_batched_tokens + ecfg.max_num_seqs, torch.int32: ecfg.max_num_seqs}, device)
        # each running sequence's pages in a device row, changed by the entries that change
        self.block_tables = DeviceBlockTables(ecfg.max_num_seqs, self.max_pages_per_seq, device)
        self.prefill_graphs: GraphCache | None = None
        self.prefill_statics: dict[int, tuple] = {}       # bucket -> static inputs, when run without graphs
        self.graphs: GraphCache | None = None
        self.graph_sizes: list[int] = []
        if device.type == "cuda":
            self._warmup()
        if self.use_graphs:
            self._capture_graphs(graph_sizes)
            if self.prefill_buckets:
                self._capture_prefill_graphs()

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
        if self.use_graphs and self.ecfg.split_mixed_steps:
            peak_activations *= 2          # the prefill graphs' pool holds a largest step's activations for good
        free, total = torch.cuda.mem_get_info(self.device)
        if self.shares_device:
            # the ranks load side by side, so the card's free memory says little: each rank takes
            # 1/N of the budget, less what it holds, its CUDA context and the all-reduce buffers
            used = torch.cuda.memory_reserved(self.device) + SHARED_RANK_OVERHEAD
            budget = self.ecfg.gpu_memory_utilization * total / self.tp.size - used - peak_activations
        else:
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

    def prepare(self, plans: list[ChunkPlan], table_rows: torch.Tensor):
        """Device inputs for a step: (input_ids, metadata, plan indices in token order, sample rows
        as a device index or None when every token samples). The host values go over in one staged,
        non-blocking copy per dtype (device/staging.py), so preparing an eager step never waits
        for a step launched ahead. table_rows: the plans' rows of the device block tables, decodes
        first (`_table_rows`)."""
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
        if prefills:
            cu = np.cumsum([0] + [plans[i].length for i in prefills])
            parts["cu"] = (cu, i32)
            if any(plans[i].start for i in prefills):
                parts["ctx"] = ([plans[i].start for i in prefills], i32)
        on_device = dict(zip(parts, self.staging.put(list(parts.values()))))
        meta = AttentionMetadata(slot_mapping=on_device["slots"], num_decode=len(decodes))
        if decodes:
            meta.decode_seq_lens = on_device["lens"]
            meta.decode_block_table = self.block_tables.gather(
                table_rows[:len(decodes)], max(len(plans[i].block_table) for i in decodes) or 1)
            meta.decode_max_seq_len = max(lens)
            meta.decode_num_splits = default_num_splits(len(decodes), self.local_kv_heads, max(lens), self.num_sms)
        if prefills:
            meta.num_prefill_tokens = int(cu[-1])
            meta.prefill_cu_seqlens = on_device["cu"]
            meta.prefill_max_len = max(plans[i].length for i in prefills)
            meta.prefill_context_lens = on_device.get("ctx")
            if meta.prefill_context_lens is not None:
                meta.prefill_block_table = self.block_tables.gather(
                    table_rows[len(decodes):], max(len(plans[i].block_table) for i in prefills))
        return on_device["ids"], meta, decodes + prefills, on_device.get("rows")

    # ---------------------------------------------------------------- execution
    @torch.inference_mode()
    def execute(self, plans: list[ChunkPlan], input_tokens: torch.Tensor | None = None):
        """Run the step. Returns (logits [N, V], the indices into `plans` of the N chunks that sample,
        in row order, their argmax ids [N] when the step computed them, else None). Nothing waits for
        the device. input_tokens: the token ids of the decodes planned ahead (`ChunkPlan.ahead`, the
        first plans; their ids in the plans are placeholders), as a device tensor, in plan order."""
        ahead = sum(c.ahead for c in plans)
        if input_tokens is not None and not (all(c.ahead for c in plans[:ahead]) and ahead == input_tokens.shape[0]
                                             and all(c.length == 1 for c in plans[:ahead])):
            raise ValueError("input_tokens feeds the decodes planned ahead, which come first")
        table_rows = self._table_rows(plans)
        decodes = [c for c in plans if c.length == 1]
        if self.prefill_buckets and len(decodes) < len(plans):
            return self._execute_split(plans, input_tokens, table_rows)
        if self.use_graphs and len(decodes) == len(plans):
            size = self._graph_size(len(plans))
            if size is not None:
                return self._replay(plans, size, input_tokens, table_rows)
        return self._execute_eager(plans, input_tokens, table_rows)

    def _table_rows(self, plans: list[ChunkPlan]) -> torch.Tensor:
        """The step's rows of the device block tables, decodes first then prefill chunks (the token
        order of every path), after sending what changed. Once per step (one staged copy)."""
        order = [c for c in plans if c.length == 1] + [c for c in plans if c.length > 1]
        return self.block_tables.update([(c.seq_id, c.block_table) for c in order]).rows

    def _execute_eager(self, plans: list[ChunkPlan], input_tokens: torch.Tensor | None, table_rows: torch.Tensor):
        """One eager forward over every chunk of the step."""
        input_ids, meta, order, rows = self.prepare(plans, table_rows)
        if input_tokens is not None:                     # the ahead decodes are the first tokens
            input_ids = input_ids.clone()
            input_ids[:input_tokens.shape[0]] = input_tokens.to(dtype=input_ids.dtype)
        hidden = self.model(input_ids, meta)
        sampling = [i for i in order if plans[i].samples]
        if not sampling:
            return hidden.new_empty(0, self.cfg.vocab_size, dtype=torch.float32), sampling, None
        selected = hidden if rows is None else hidden[rows]
        return self.model.compute_logits(selected), sampling, None

    # ---------------------------------------------------------------- mixed steps, in parts
    def _execute_split(self, plans: list[ChunkPlan], input_tokens: torch.Tensor | None, table_rows: torch.Tensor):
        """The step as its decodes (their graph, or one eager forward) and each prefill chunk (the
        graph of its bucket, or its body run eagerly on the bucket's static inputs)."""
        decodes = [i for i, c in enumerate(plans) if c.length == 1]
        prefills = [i for i, c in enumerate(plans) if c.length > 1]
        logits, sampling, greedy = [], [], []
        if decodes:
            part = [plans[i] for i in decodes]
            size = self._graph_size(len(part)) if self.use_graphs else None
            out, rows, ids = (self._replay(part, size, input_tokens, table_rows) if size is not None
                              else self._execute_eager(part, input_tokens, table_rows))
            logits.append(out)
            greedy.append(ids)
            sampling += [decodes[r] for r in rows]
        prefill_rows = table_rows[len(decodes):]
        for i, (out, ids) in zip(prefills, self._run_prefills([plans[i] for i in prefills], prefill_rows)):
            if plans[i].samples:
                logits.append(out)
                greedy.append(ids)
                sampling.append(i)
        if not logits:
            return torch.empty(0, self.cfg.vocab_size, dtype=torch.float32, device=self.device), [], None
        dtypes = {t.dtype for t in logits}
        if len(dtypes) > 1:                              # graphs give the model dtype, eager float32
            logits = [t.float() for t in logits]
        ids = None if any(g is None for g in greedy) else torch.cat(greedy)
        return torch.cat(logits), sampling, ids

    def _prefill_buckets(self) -> list[int]:
        cap = min(self.ecfg.max_num_batched_tokens, self.max_model_len)
        buckets, b = [], PREFILL_BUCKET_MIN
        while b < cap:
            buckets.append(b)
            b *= 2
        return buckets + [cap]

    def _prefill_bucket(self, length: int) -> int:
        return next(b for b in self.prefill_buckets if b >= length)

    def _prefill_static_inputs(self, bucket: int):
        """A prefill graph's static inputs: ids and cache slots [bucket] (slots -1: no write), the
        chunk's context length [1] and page list [1, max_pages], the row that samples [1], and the
        bounds [0, bucket] (made here: a graph cannot copy from the host while capturing)."""
        dev = self.device
        return (torch.zeros(bucket, dtype=torch.long, device=dev), torch.full((bucket,), -1, dtype=torch.long, device=dev),
                torch.zeros(1, dtype=torch.int32, device=dev),
                torch.zeros(1, self.max_pages_per_seq, dtype=torch.int32, device=dev),
                torch.zeros(1, dtype=torch.long, device=dev), torch.tensor([0, bucket], dtype=torch.int32, device=dev))

    def _prefill_body(self, bucket: int, ids, slots, context, table, row, bounds):
        meta = AttentionMetadata(
            slot_mapping=slots, num_prefill_tokens=bucket, prefill_cu_seqlens=bounds,
            prefill_max_len=bucket, prefill_context_lens=context, prefill_block_table=table)
        logits = self.model.compute_logits_raw(self.model(ids, meta).index_select(0, row))
        return logits, argmax_rows(logits, backend=self.kernels.backend)

    @torch.inference_mode()
    def _capture_prefill_graphs(self) -> None:
        """One graph per prefill bucket, the biggest first, in a pool apart from the decode graphs'
        (a mixed step reads the decode graph's logits after the prefill graphs ran)."""
        t0 = time.perf_counter()
        self.prefill_graphs = GraphCache(self._prefill_body, self._prefill_static_inputs, self.device)
        for bucket in reversed(self.prefill_buckets):
            self.prefill_graphs.entry(bucket)
        torch.cuda.synchronize(self.device)
        log.info("captured %d prefill graphs in %.1f s", len(self.prefill_buckets), time.perf_counter() - t0)

    def _run_prefills(self, chunks: list[ChunkPlan], table_rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits [1, V], argmax [1]) of each chunk's last row. The chunks' inputs go over in one
        staged copy; each chunk then fills its bucket's static inputs on the device (its page list
        from its row of the device block tables) and runs."""
        buckets = [self._prefill_bucket(c.length) for c in chunks]
        parts = []
        for c, bucket in zip(chunks, buckets):
            ids = np.zeros(bucket, dtype=np.int64)
            ids[:c.length] = c.tokens
            slots = np.full(bucket, -1, dtype=np.int64)
            slots[:c.length] = self._slots(c.block_table, c.start, c.length)
            parts += [(ids, torch.long), (slots, torch.long), ([c.length - 1], torch.long),
                      ([c.start], torch.int32)]
        staged = self.prefill_staging.put(parts)
        outputs = []
        for k, (c, bucket) in enumerate(zip(chunks, buckets)):
            ids, slots, row, context = staged[4 * k:4 * k + 4]
            if self.prefill_graphs is not None:
                graph, static, (logits, greedy) = self.prefill_graphs.entry(bucket)
            else:
                static = self.prefill_statics.get(bucket)
                if static is None:
                    static = self.prefill_statics[bucket] = self._prefill_static_inputs(bucket)
            s_ids, s_slots, s_context, s_table, s_row, _ = static
            s_ids.copy_(ids)
            s_slots.copy_(slots)
            s_context.copy_(context)
            torch.index_select(self.block_tables.tables, 0, table_rows[k:k + 1], out=s_table)
            s_row.copy_(row)
            if self.prefill_graphs is not None:
                graph.replay()
            else:
                logits, greedy = self._prefill_body(bucket, *static)
            # the outputs are the bucket's static buffers: a later chunk of the same bucket overwrites them
            outputs.append((logits.clone(), greedy.clone()))
        return outputs

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

    def _graph_body(self, size: int, ids: torch.Tensor, meta: AttentionMetadata, table_rows: torch.Tensor):
        meta.decode_block_table = self.block_tables.tables.index_select(0, table_rows)
        logits = self.model.compute_logits_raw(self.model(ids, meta))   # model dtype
        return logits, argmax_rows(logits, backend=self.kernels.backend)

    def _graph_inputs(self, size: int):
        """A decode graph's static inputs: views of the buffers all graphs share, `io` [3, B] int64 =
        token ids, cache slots, sequence lengths, and `table_rows` [B] int32: the rows of the device
        block tables, gathered inside the graph."""
        meta = AttentionMetadata(
            slot_mapping=self.io[1, :size], num_decode=size, decode_block_table=None,
            decode_seq_lens=self.io[2, :size], decode_max_seq_len=self.max_model_len,
            decode_num_splits=default_num_splits(size, self.local_kv_heads, self.max_model_len, self.num_sms))
        return self.io[0, :size], meta, self.table_rows[:size]

    @torch.inference_mode()
    def _capture_graphs(self, sizes: list[int]) -> None:
        """One graph per decode batch size, the biggest first (the smaller ones reuse its memory)."""
        t0 = time.perf_counter()
        biggest = sizes[-1]
        self.io = torch.zeros(3, biggest, dtype=torch.long, device=self.device)
        self.io[1].fill_(-1)
        self.table_rows = torch.full((biggest,), self.block_tables.pad_row, dtype=torch.int32, device=self.device)
        self.graphs = GraphCache(self._graph_body, self._graph_inputs, self.device)
        for size in reversed(sizes):
            self.graphs.entry(size)
        self.graph_sizes = sizes
        torch.cuda.synchronize(self.device)
        self.graph_capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode graphs in %.1f s", len(sizes), self.graph_capture_seconds)

    def _replay(self, plans: list[ChunkPlan], size: int, input_tokens: torch.Tensor | None, table_rows: torch.Tensor):
        n, ps = len(plans), self.page_size
        io = np.zeros((3, size), dtype=np.int64)
        io[1, n:] = -1
        for i, c in enumerate(plans):
            table = c.block_table
            io[0, i] = c.tokens[0]
            io[1, i] = table[c.start // ps] * ps + c.start % ps
            io[2, i] = c.start + 1
        # through pinned buffers used by turns (device/staging.py): a step's inputs are staged while
        # the step launched before it may still have its copies queued
        self.staging.put_into([(io, self.io[:, :size])])
        self.table_rows[:n].copy_(table_rows[:n])
        if n < size:
            self.table_rows[n:size].fill_(self.block_tables.pad_row)       # padding rows read the zero row
        if input_tokens is not None:
            self.io[0, :input_tokens.shape[0]].copy_(input_tokens)   # the previous step's samples, never on the host
        graph, _, (logits, greedy) = self.graphs.entry(size)
        graph.replay()
        # The outputs are static buffers: the next replay overwrites them, so the caller consumes them
        # (on the stream) before that.
        rows = [i for i, c in enumerate(plans) if c.samples]
        if len(rows) == n:
            return logits[:n], rows, greedy[:n]
        index = values_to_device(rows, torch.long, self.device)   # a 1-token prompt chunk that doesn't sample yet
        return logits[index], rows, greedy[index]
