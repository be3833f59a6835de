"""One request's time to first token, split where the time went: the waterfall the router returns.

    router_s           router: request in (before its body is read) -> prefill (mono: generate) request out
    http_s             the control hops: the router's round trip to that worker minus the worker's own time
    queue_s            worker: took the request -> start of the engine step that ran its first prompt chunk
    prefill_s          that step's start -> first token sampled (every chunk of the prompt, and whatever
                       shared those steps with it)
    kv_transfer_s      first token -> the decode worker acked the whole KV (export, send, ack; layer-wise:
                       what was left after the prefill); 0 in mono
    first_token_out_s  the worker's last mark -> the router has the first token ready for the client (the
                       worker's reply, parsing, the router's hand-over)

The parts add up to the router's TTFT (`labkit_router_ttft_seconds`) exactly, by construction, and
to what a client measures up to the client's own overhead (tests/test_serve_waterfall.py holds them
to 5% of it). Each part is measured on one clock: the router's for router_s, http_s and
first_token_out_s, the worker's for queue_s, prefill_s and kv_transfer_s; no two processes' clocks are
compared. Beside the parts: `kv_bytes` moved in `kv_window_s` (`kv_gb_per_s` over that same window),
`kv_transport`, `kv_stream`, `kv_flag` (a transfer far slower than this host's measured figure,
labkit.transfer.reference), `cached_tokens` (prompt tokens the prefill worker's prefix cache served),
the upstreams, and `decode_admit_s`: the decode worker received and adopted the KV. It comes after
the first token (the prefill worker samples the first token and the router streams it at once), so it
delays the second token and is not a part of the TTFT.

How a client gets it: send `"return_waterfall": true` (an extra body field, as vLLM's
`return_token_ids`; the openai client passes it with `extra_body`) and the usage block carries
`"waterfall": {...}` (streamed: the final usage chunk, `stream_options.include_usage`). The openai
client keeps it (`completion.usage.model_extra["waterfall"]`). `/metrics` has every part as
`labkit_router_ttft_part_seconds{part=...}` for every request, asked or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labkit.serve.messages import PrefillResult, StreamTiming

PARTS = ("router_s", "http_s", "queue_s", "prefill_s", "kv_transfer_s", "first_token_out_s")


@dataclass(slots=True)
class RequestTiming:
    """What the backend saw of one request: its own marks (perf_counter, router process) and what the
    worker reported (seconds on the worker's clock). Filled as the request goes; `report` reads it."""

    mode: str  # "mono" | "disagg"
    prompt_tokens: int = 0
    upstream: str = ""  # the mono or prefill worker
    sent_at: float = 0.0  # the prefill / generate request left the router
    reply_at: float = 0.0  # its reply (mono: the first token line) arrived
    worker_s: float = 0.0  # the worker's own time, took the request -> reply left
    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    cached_tokens: int = 0
    kv_bytes: int = 0
    kv_window_s: float = 0.0
    kv_transport: str = ""
    kv_stream: str = ""
    kv_flag: str | None = None
    decode_upstream: str = ""
    decode_admit_s: float | None = None

    @property
    def complete(self) -> bool:
        """True once a worker's marks arrived (a backend that reports none leaves it False)."""
        return self.reply_at > 0.0

    def prefill_reply(self, res: PrefillResult, upstream: str, sent_at: float, reply_at: float) -> None:
        """Takes a prefill worker's PrefillResult (its marks are offsets from when it took the request)."""
        self.upstream, self.sent_at, self.reply_at, self.worker_s = upstream, sent_at, reply_at, res.reply_s
        self.queue_s = res.prefill_start_s
        self.prefill_s = res.prefill_s - res.prefill_start_s
        self.kv_transfer_s = res.kv_acked_s - res.prefill_s if res.kv_bytes else 0.0
        self.cached_tokens = res.cached_tokens
        self.kv_bytes, self.kv_window_s, self.kv_transport = res.kv_bytes, res.kv_window_s, res.kv_transport
        self.kv_stream, self.kv_flag = res.kv_stream if res.kv_bytes else "", res.kv_flag

    def mono_first_line(self, t: StreamTiming, upstream: str, sent_at: float, reply_at: float) -> None:
        """Takes a mono worker's first token line's StreamTiming."""
        self.upstream, self.sent_at, self.reply_at, self.worker_s = upstream, sent_at, reply_at, t.sent_s
        self.queue_s = t.ready_s
        self.prefill_s = (t.first_token_s if t.first_token_s is not None else t.ready_s) - t.ready_s
        self.cached_tokens = t.cached_tokens

    def parts(self, t_in: float, t_out: float) -> dict[str, float]:
        """The TTFT's parts in seconds (PARTS order); `t_in`: the router took the request, `t_out`: it had
        the first token ready (both perf_counter in the router's process). They sum to t_out - t_in."""
        worker_marks = self.queue_s + self.prefill_s + self.kv_transfer_s
        return {
            "router_s": self.sent_at - t_in,
            "http_s": (self.reply_at - self.sent_at) - self.worker_s,
            "queue_s": self.queue_s,
            "prefill_s": self.prefill_s,
            "kv_transfer_s": self.kv_transfer_s,
            "first_token_out_s": (t_out - self.reply_at) + (self.worker_s - worker_marks),
        }

    def report(self, t_in: float, t_out: float) -> dict[str, Any]:
        """The waterfall as the usage block carries it: the parts, `ttft_s`, and the KV and cache figures."""
        out: dict[str, Any] = {
            "mode": self.mode,
            **self.parts(t_in, t_out),
            "ttft_s": t_out - t_in,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "upstream": self.upstream,
        }
        if self.mode == "disagg":
            out.update(
                kv_bytes=self.kv_bytes,
                kv_window_s=self.kv_window_s,
                kv_gb_per_s=self.kv_bytes / self.kv_window_s / 1e9 if self.kv_window_s > 0 else None,
                kv_transport=self.kv_transport,
                kv_stream=self.kv_stream,
                kv_flag=self.kv_flag,
                decode_upstream=self.decode_upstream,
                decode_admit_s=self.decode_admit_s,
            )
        return out
