"""Every message that crosses a process edge inside the server, as frozen typed classes.

    router  --GenerateRequest-->  mono worker     --TokenEvent lines-->  router
    router  --PrefillRequest-->   prefill worker  --PrefillResult-->     router
    router  --DecodeRequest-->    decode worker   --TokenEvent lines-->  router
    router  --GenerateRequest-->  decode worker   --TokenEvent lines-->  router   (selective: a short
                                  prompt prefilled where it decodes; the worker runs with local_prefill)
    (the first TokenEvent line of a stream carries StreamTiming: where the worker's time went)
    router  --GET /health-->      any worker      --WorkerHealth-->      router (upstream, metrics)

Both sides import these classes; nothing is a dict built in one file and read by string keys
in another. The KV bytes are not here: they travel over the transport (labkit.transfer).

Why pydantic (not msgspec): FastAPI already depends on it, so it adds nothing to install; it
validates JSON strictly (a bool is not a token id, an unknown field is an error) and says which
field is wrong, which is what a 400 answer needs; and it validates the engine's own
`SamplingParams` dataclass in place, so sampling settings are defined once, in the engine.
msgspec decodes faster, but these control messages are small next to the KV they announce.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from labkit.engine.config import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
KVStream = Literal["whole", "layers"]
RequestId = Annotated[str, Field(min_length=1, max_length=200)]
TokenId = Annotated[int, Field(ge=0)]


def new_request_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """Frozen; unknown fields refused; JSON types taken strictly."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class GenerateRequest(Message):
    """Router -> mono worker (or a decode worker with local_prefill), `POST /internal/generate`: run the
    prompt and stream every token."""

    request_id: RequestId = Field(default_factory=new_request_id)
    prompt_ids: list[TokenId] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)


class PrefillRequest(GenerateRequest):
    """Router -> prefill worker, `POST /internal/prefill`: run the prompt, sample the first token,
    send the KV to `kv_endpoint` (the decode worker's receiver; None: keep nothing, send nothing),
    whole or layer by layer (`kv_stream`; None: the worker's `--kv-stream`)."""

    kv_endpoint: str | None = None
    kv_stream: KVStream | None = None


class PrefillResult(Message):
    """Prefill worker -> router: the first token, whether it already ends the request, and timings.

    Times are seconds from the moment the worker took the request: its prefill began at
    `prefill_start_s` (the engine step that ran its first prompt chunk; before it, the request
    queued), ended at `prefill_s` (first token sampled), the decode worker acked the whole KV at
    `kv_acked_s` (0 when nothing was sent), so `kv_acked_s - prefill_s` is the transfer time the
    request waited for, and the reply left at `reply_s`. `layer_sent_s[i]`: when layer i's KV left
    the sender (layer-wise only, else empty).

    `kv_bytes` moved in `kv_window_s` (whole: from the first token to the ack, so the KV's export
    is in it; layers: from the first layer handed over to the ack, which overlaps the prefill).
    `kv_flag` says so when that was far slower than this host's measured figure for `kv_transport`
    (labkit.transfer.reference).
    """

    request_id: RequestId
    first_token_id: TokenId
    finish_reason: FinishReason | None  # None: the decode worker goes on from the first token
    num_prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    kv_bytes: int = 0
    kv_stream: KVStream = "whole"
    kv_transport: str = ""
    prefill_start_s: float = 0.0
    prefill_s: float
    transfer_s: float = 0.0  # the transport's clock: send start to the receiver's ack
    kv_acked_s: float = 0.0
    kv_window_s: float = 0.0
    kv_flag: str | None = None
    reply_s: float = 0.0
    layer_sent_s: list[float] = Field(default_factory=list)


class DecodeRequest(Message):
    """Router -> decode worker, `POST /internal/decode`: claim the request's KV, stream the tokens
    after the first. `timeout_s`: how long to wait for the KV (None: the worker's transfer timeout)."""

    request_id: RequestId
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    timeout_s: float | None = Field(default=None, gt=0, le=600)


class ErrorInfo(Message):
    """An OpenAI-style error (the `error` object of an error body)."""

    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None


class StreamTiming(Message):
    """Rides a token stream's first line: seconds from the moment the worker took the request.

    mono: its prefill began at `ready_s`, its first token was sampled at `first_token_s`.
    decode: its KV was received and adopted by the engine at `ready_s` (decode admission).
    `sent_s`: this line left the worker.
    """

    ready_s: float
    first_token_s: float | None = None
    sent_s: float
    cached_tokens: int = 0


class TokenEvent(Message):
    """One line of a worker's NDJSON token stream: a token, the end (finish_reason), or an error."""

    token_id: TokenId | None = None
    finish_reason: FinishReason | None = None
    error: ErrorInfo | None = None
    timing: StreamTiming | None = None  # on the first line only

    def line(self) -> bytes:
        return (self.model_dump_json(exclude_none=True) + "\n").encode()


class WorkerHealth(Message):
    """A worker's `GET /health`: who it is, what its engine is built like, its load and its totals.

    The router sizes its prefix index (`block_size`, `kv_blocks_total`) and checks the context
    (`max_model_len`) from this reply; totals come from the worker's Prometheus registry.
    """

    status: str  # "ok", or why not
    role: Literal["mono", "prefill", "decode"]
    name: str
    model: str
    pid: int
    model_fingerprint: str
    block_size: int
    max_model_len: int
    policy: str
    transfer: str
    kv_stream: KVStream
    kv_endpoint: str | None  # decode workers: where prefill workers send the KV
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    running_requests: int
    prefill_tokens_total: int
    decode_tokens_total: int
    kv_transfer_bytes_total: int  # sent (prefill) or received (decode)
    kv_transfer_seconds_total: float
    engine_errors_total: int
    kv_slow_transfers_total: int = 0
    kv_flag: str | None = None  # the last transfer flagged as far slower than this host's measured figure
