"""The engine: requests in, one `step()` at a time, tokens out; plus the disaggregation hooks.

    eng = Engine(EngineConfig(model="tiny"))
    outs = eng.generate([[256, 72, 105]], SamplingParams(max_tokens=8))

Each step asks the scheduler for a batch, flattens it into one row per token, runs the model
once, samples a token for every sequence whose uncomputed tokens are all done, and reports
what it did (`StepOutput`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import warnings
from collections.abc import Sequence as Seq
from dataclasses import asdict

import torch

from labkit.engine import kernels
from labkit.engine.config import EngineConfig, RequestError, SamplingParams, check_context
from labkit.engine.cuda_graphs import DecodeGraphs
from labkit.engine.kv_cache import BlockPool, KVCache
from labkit.engine.model import AttentionMeta, CausalLM, ModelConfig, load_safetensors
from labkit.engine.sampling import sample
from labkit.engine.scheduler import Batch, Scheduler
from labkit.engine.sequence import (
    FinishReason,
    LayerKVCallback,
    RequestOutput,
    Sequence,
    Status,
    StepOutput,
    TokenCallback,
)
from labkit.kv import KVExport, kv_bytes_per_token
from labkit.models import MANIFEST, ensure_model


def model_fingerprint(model_dir, hf_config: dict) -> str:
    """16 hex digits naming a model's config and weights (from the manifest checksums, else file sizes)."""
    h = hashlib.sha256(json.dumps(hf_config, sort_keys=True).encode())
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        h.update(
            json.dumps(
                {k: v.get("sha256") for k, v in files.items() if k.endswith(".safetensors")}, sort_keys=True
            ).encode()
        )
    else:
        for f in sorted(model_dir.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = cfg = config
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        if cfg.random_weights:
            from labkit.models import get_preset, random_hf_model

            self.model_dir = None
            hf = get_preset(cfg.model).hf_config()
            weights = random_hf_model(cfg.model, cfg.dtype, cfg.device).state_dict()
            self.model_fingerprint = "random-" + hashlib.sha256(json.dumps(hf, sort_keys=True).encode()).hexdigest()[:9]
        else:
            self.model_dir = ensure_model(cfg.model, quiet=True)
            hf = json.loads((self.model_dir / "config.json").read_text())
            weights = load_safetensors(self.model_dir)
            self.model_fingerprint = model_fingerprint(self.model_dir, hf)
        self.model_config = mc = ModelConfig.from_hf(hf)
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        self.model = CausalLM(
            mc,
            weights,
            self.dtype,
            self.device,
            self.max_model_len,
            rows_hint=cfg.max_num_batched_tokens,
            native=cfg.native_kernels,
        )
        if self.model.native_note:
            warnings.warn(
                f"labkit engine: native CPU kernels not used ({self.model.native_note}); "
                "PyTorch paths instead (same results, slower small-batch decode)",
                RuntimeWarning,
                stacklevel=2,
            )
        elif self.model.native:
            kernels.pin_threads()
        del weights
        self.kv_bytes_per_token = kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.dtype)
        num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_bytes // (cfg.block_size * self.kv_bytes_per_token))
        # CUDA graphs pad batches with rows that write one block no sequence owns: the last one.
        self.cache = KVCache(
            mc.num_layers,
            num_blocks + cfg.cuda_graphs,
            cfg.block_size,
            mc.num_kv_heads,
            mc.head_dim,
            self.dtype,
            self.device,
        )
        self.pool = BlockPool(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.pool)
        self._seqs: dict[str, Sequence] = {}
        self._done: list[RequestOutput] = []  # finished outside step(): reported by the next step
        self._late_tokens: list[tuple[Sequence, int]] = []  # on_token calls owed to imports that finished at once
        self._ids = itertools.count()
        self._generator = torch.Generator().manual_seed(0)  # for unseeded sampling
        self._forward = self.model.forward
        if cfg.compile_decode and self.device.type == "cuda":
            # Decode steps repeat the same shapes; compiling fuses the small ops between matmuls.
            self._forward = torch.compile(self.model.forward, dynamic=True)
        self._graphs: DecodeGraphs | None = None
        if cfg.cuda_graphs:
            self._graphs = DecodeGraphs(
                self._forward,
                self.cache,
                cfg.block_size,
                num_blocks,
                min(cfg.max_num_seqs, 512),
                -(-self.max_model_len // cfg.block_size),
                self.device,
                capture=self.device.type == "cuda",
            )
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0
        self.prompt_tokens = 0

    # --- state --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._done)

    # --- requests -----------------------------------------------------------------------
    def _new_id(self, request_id: str | None) -> str:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._seqs:
            raise RequestError(f"request_id {rid!r} is already in the engine", "request_id")
        return rid

    def _check_fits(self, num_prompt: int, sp: SamplingParams) -> None:
        """Raises RequestError (naming the field) unless the request fits the context and the KV pool."""
        if num_prompt >= self.max_model_len:
            raise RequestError(
                f"prompt has {num_prompt} tokens; max_model_len is {self.max_model_len} (it must "
                "leave room for at least one output token)",
                "prompt_ids",
                "context_length_exceeded",
            )
        check_context(num_prompt, sp.max_tokens, self.max_model_len)
        need = self.pool.blocks_for(num_prompt + sp.max_tokens)
        if need > self.num_total_blocks:
            raise RequestError(
                f"prompt ({num_prompt}) + max_tokens ({sp.max_tokens}) needs {need} KV blocks; the pool "
                f"has {self.num_total_blocks}: lower max_tokens or raise kv_cache_bytes",
                "max_tokens",
            )

    def add_request(
        self,
        prompt_ids: Seq[int],
        sp: SamplingParams | None = None,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
        on_layer_kv: LayerKVCallback | None = None,
    ) -> str:
        """Queues a request; returns its id. Raises ValueError on bad input (empty prompt, id out of vocab, too long)."""
        if self.config.policy == "decode_only":
            raise ValueError("a decode_only engine takes requests through import_kv(), not add_request()")
        sp = sp or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise RequestError("prompt_ids is empty: a prompt needs at least one token (e.g. BOS)", "prompt_ids")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise RequestError(
                f"prompt_ids holds {bad[0]}, outside the vocabulary [0, {self.model_config.vocab_size})", "prompt_ids"
            )
        self._check_fits(len(ids), sp)
        rid = self._new_id(request_id)
        seq = Sequence(rid, ids, sp, on_token=on_token, on_layer_kv=on_layer_kv)
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        self.prompt_tokens += len(ids)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks now; its RequestOutput ("abort") comes with the next step. False if unknown."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    def release(self, request_id: str) -> bool:
        """Frees a prefilled request's blocks without exporting them; False if unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self.pool.release(seq)
        seq.status = Status.FINISHED
        return True

    def _finish(self, seq: Sequence, reason: FinishReason, hold_blocks: bool = False) -> RequestOutput:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        if hold_blocks:
            seq.status = Status.PREFILLED
        else:
            seq.status = Status.FINISHED
            self.pool.release(seq)
            self._seqs.pop(seq.request_id, None)
        out = RequestOutput(
            seq.request_id,
            list(seq.prompt_ids),
            seq.output_ids,
            reason,
            seq.num_cached_tokens,
            seq.num_preemptions,
            None if seq.first_token_s is None else seq.first_token_s - seq.arrival_s,
        )
        if reason == "abort":
            self._done.append(out)
        return out

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sp = seq.sp
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.model_config.eos_token_ids):
            return "stop"
        if len(seq.token_ids) - len(seq.prompt_ids) >= sp.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    # --- the loop -----------------------------------------------------------------------
    def step(self) -> StepOutput:
        """Runs one batch (prefill chunks and/or decodes); returns what happened, with timings in seconds."""
        t0 = time.perf_counter()
        finished, self._done = self._done, []
        late, self._late_tokens = self._late_tokens, []
        for seq, tok in late:
            if seq.on_token is not None:
                seq.on_token(seq.request_id, tok, True)
        batch = self.scheduler.schedule()
        context_tokens = sum(len(s.token_ids) for s in batch.decodes)
        started: dict[str, int] = {}
        for seq, _ in batch.chunks:
            if seq.prefill_start_s is None:  # a recompute after preemption keeps its first start
                seq.prefill_start_s = t0
                started[seq.request_id] = seq.num_cached_tokens
        self.num_preemptions += len(batch.preempted)
        new_tokens: dict[str, int] = {}
        if batch.phase != "idle":
            with torch.inference_mode():
                sampled = self._run(batch)
            for seq, tok in sampled:
                was_prefill = seq.status == Status.WAITING
                seq.token_ids.append(tok)
                if seq.first_token_s is None:
                    seq.first_token_s = time.perf_counter()
                new_tokens[seq.request_id] = tok
                # One stop rule for every policy: a prefill-only engine reports "stop" or "length" when
                # the first token already ends the request, and holds the KV ("prefilled") only otherwise.
                reason = self._stop_reason(seq, tok)
                if reason is not None:
                    finished.append(self._finish(seq, reason))
                elif was_prefill and self.config.policy == "prefill_only":
                    finished.append(self._finish(seq, "prefilled", hold_blocks=True))
                    reason = "prefilled"
                elif was_prefill:
                    self.scheduler.prefill_done(seq)
                if seq.on_token is not None:
                    seq.on_token(seq.request_id, tok, reason is not None)
        return StepOutput(
            batch.phase,
            batch.num_prefill_tokens,
            len(batch.decodes),
            new_tokens,
            finished,
            time.perf_counter() - t0,
            context_tokens,
            started,
        )

    def _run(self, batch: Batch) -> list[tuple[Sequence, int]]:
        """Builds the flat batch, runs the model, samples; returns (sequence, token) for each sampled sequence."""
        bs, dev = self.config.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        nd = len(batch.decodes)
        if self._graphs is not None and not batch.chunks and self._graphs.fits(batch.decodes):
            return self._finish_run(batch, self._graphs.run(batch.decodes), list(batch.decodes), None)
        decode_blocks = decode_mask = decode_ctx = None
        if nd:
            width = max(len(s.block_table) for s in batch.decodes)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.decodes]
            decode_blocks = torch.tensor(tables, dtype=torch.int64, device=dev)
            decode_ctx = ctx = torch.tensor([len(s.token_ids) for s in batch.decodes], device=dev)
            if not self.model.native:  # the native kernel reads the context lengths instead
                decode_mask = (torch.arange(width * bs, device=dev)[None, :] < ctx[:, None]).view(nd, 1, 1, -1)
            for i, s in enumerate(batch.decodes):
                p = len(s.token_ids) - 1
                ids.append(s.token_ids[-1])
                pos.append(p)
                sample_rows.append(i)
                sample_seqs.append(s)
            last = ctx - 1
            slots.append(decode_blocks.gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs)
        chunks: list[tuple[int, int, int, torch.Tensor | None]] = []
        for s, n in batch.chunks:
            start, ctx_len = s.num_computed_tokens, s.num_computed_tokens + n
            row = len(ids)
            ids.extend(s.token_ids[start:ctx_len])
            pos.extend(range(start, ctx_len))
            slots.append(self.cache.slots(s.block_table, start, ctx_len))
            blocks = None if start == 0 else torch.tensor(s.block_table[: self.pool.blocks_for(ctx_len)], device=dev)
            chunks.append((row, n, ctx_len, blocks))
            if ctx_len == len(s.token_ids):
                sample_rows.append(row + n - 1)
                sample_seqs.append(s)
        meta = AttentionMeta(torch.cat(slots), nd, decode_blocks, decode_mask, chunks, decode_ctx)
        hook = self._layer_kv_hook(batch)
        # The compiled forward (GPU) only sees decode-only batches: their shapes repeat, chunk loops do not.
        fwd = self._forward if not chunks else self.model.forward
        hidden = fwd(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta, self.cache, hook)
        return self._finish_run(batch, hidden, sample_seqs, sample_rows)

    def _finish_run(
        self, batch: Batch, hidden: torch.Tensor, sample_seqs: list[Sequence], sample_rows: list[int] | None
    ) -> list[tuple[Sequence, int]]:
        """Commits the step's tokens to the block pool, then samples from the hidden rows `sample_rows` (None: all)."""
        for s in batch.decodes:
            s.num_computed_tokens += 1
            self.pool.commit(s)
        for s, n in batch.chunks:
            s.num_computed_tokens += n
            self.pool.commit(s)
            if not s.output_ids and s.num_computed_tokens == len(s.token_ids):
                self.prefix_cache_hit_tokens += s.num_cached_tokens
        if not sample_seqs:
            return []
        rows = hidden if sample_rows is None else hidden[torch.tensor(sample_rows, device=self.device)]
        logits = self.model.logits(rows)
        tokens = sample(logits, [s.sp for s in sample_seqs], [len(s.token_ids) for s in sample_seqs], self._generator)
        return list(zip(sample_seqs, tokens))

    def _layer_kv_hook(self, batch: Batch):
        """Calls on_layer_kv(request_id, layer, k, v) for prompts whose prefill completes in this batch."""
        done = [
            (s, cb)
            for s, n in batch.chunks
            if (cb := s.on_layer_kv) is not None and not s.output_ids and s.num_computed_tokens + n == len(s.token_ids)
        ]
        if not done:
            return None

        def hook(layer: int) -> None:
            for s, cb in done:
                k, v = self.cache.read(s.block_table, len(s.prompt_ids), layer)
                cb(s.request_id, layer, k, v)

        return hook

    def generate(
        self, prompts: Seq[Seq[int]], sp: SamplingParams | Seq[SamplingParams] | None = None, progress: bool = False
    ) -> list[RequestOutput]:
        """Runs `prompts` to completion (with any requests already queued); returns their outputs in order."""
        sps: list[SamplingParams] = (
            list(sp)
            if isinstance(sp, (list, tuple))
            else [sp if isinstance(sp, SamplingParams) else SamplingParams()] * len(prompts)
        )
        if len(sps) != len(prompts):
            raise ValueError(f"{len(sps)} SamplingParams for {len(prompts)} prompts")
        rids = [self.add_request(p, s) for p, s in zip(prompts, sps)]
        want, results = set(rids), dict[str, RequestOutput]()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rids), desc="generate", unit="req")
        while len(results) < len(rids):
            out = self.step()
            for r in out.finished:
                if r.request_id in want:
                    results[r.request_id] = r
                    if bar is not None:
                        bar.update(1)
            if out.phase == "idle" and not self.has_unfinished() and len(results) < len(rids):
                raise RuntimeError("engine went idle with requests unfinished (aborted elsewhere?)")
        if bar is not None:
            bar.close()
        return [results[r] for r in rids]

    def prompt_logits(self, prompt_ids: Seq[int]) -> torch.Tensor:
        """fp32 logits [len(prompt_ids), vocab] of one uncached forward over the prompt (for reference checks)."""
        seq = Sequence("__logits__", [int(t) for t in prompt_ids], SamplingParams())
        if not self.pool.grow(seq, len(seq.token_ids)):
            raise RuntimeError(f"not enough free KV blocks for a {len(seq.token_ids)}-token forward")
        try:
            n = len(seq.token_ids)
            meta = AttentionMeta(self.cache.slots(seq.block_table, 0, n), 0, None, None, [(0, n, n, None)])
            with torch.inference_mode():
                hidden = self.model.forward(
                    torch.tensor(seq.token_ids, device=self.device),
                    torch.arange(n, device=self.device),
                    meta,
                    self.cache,
                )
                return self.model.logits(hidden).cpu()
        finally:
            self.pool.release(seq)

    # --- disaggregation -----------------------------------------------------------------
    def export_kv(self, request_id: str) -> KVExport:
        """The prompt KV of a prefilled request (tensors on CPU) plus its first token; frees its blocks."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise KeyError(f"no request {request_id!r} in this engine")
        if seq.status != Status.PREFILLED:
            raise ValueError(
                f"request {request_id!r} is {seq.status.value}, not prefilled: export_kv needs "
                "policy='prefill_only' and a finished prefill"
            )
        k, v = self.cache.read(seq.block_table, len(seq.prompt_ids))
        mc = self.model_config
        kv = KVExport(
            request_id,
            self.model_fingerprint,
            list(seq.prompt_ids),
            seq.output_ids[0],
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            self.config.dtype,
            self.config.block_size,
            k.cpu(),
            v.cpu(),
            extra={"sampling": asdict(seq.sp), "num_cached_tokens": seq.num_cached_tokens},
        )
        self.release(request_id)
        return kv

    def import_kv(
        self,
        kv: KVExport,
        sp: SamplingParams | None = None,
        request_id: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> str:
        """Adopts a prefilled request's KV and decodes on from kv.first_token_id; returns the request id.

        on_token is called for the tokens after the first (the prefill side reported that one),
        except when the first token already ends the request: then it is called once with
        (id, first_token, True) in the next step. Without enough free blocks the prompt is
        recomputed here instead (never an error). Raises ValueError naming a field that does not fit.
        """
        kv.validate()
        mc = self.model_config
        for name, mine in (
            ("model_fingerprint", self.model_fingerprint),
            ("num_layers", mc.num_layers),
            ("num_kv_heads", mc.num_kv_heads),
            ("head_dim", mc.head_dim),
            ("dtype", self.config.dtype),
        ):
            if getattr(kv, name) != mine:
                raise ValueError(f"kv.{name} is {getattr(kv, name)!r}, this engine has {mine!r}")
        if not 0 <= kv.first_token_id < mc.vocab_size:
            raise ValueError(f"kv.first_token_id {kv.first_token_id} is outside the vocabulary [0, {mc.vocab_size})")
        sp = sp or SamplingParams()
        self._check_fits(kv.num_tokens, sp)
        rid = self._new_id(request_id if request_id is not None else kv.request_id)
        seq = Sequence(rid, list(kv.prompt_ids), sp, on_token=on_token)
        seq.token_ids.append(int(kv.first_token_id))
        seq.first_token_s = seq.arrival_s
        self._seqs[rid] = seq
        reason = self._stop_reason(seq, kv.first_token_id)
        if reason is not None:
            self._done.append(self._finish(seq, reason))
            self._late_tokens.append((seq, kv.first_token_id))
            return rid
        if self.pool.grow(seq, kv.num_tokens):
            self.cache.load(seq.block_table, kv.k, kv.v)
            seq.num_computed_tokens = kv.num_tokens
            self.pool.commit(seq)
            self.scheduler.add_running(seq)
        else:
            self.scheduler.add(seq)  # recompute prompt + first token when blocks free up
        return rid
