"""The OpenAI completions protocol: request validation, responses, stream chunks, errors.

What the router speaks to clients (the `openai` package, `vllm bench serve`, curl). A bad
request raises `APIError`, which the server turns into an HTTP 4xx with the OpenAI error
body `{"error": {"message", "type", "param", "code"}}`. Unknown fields are ignored, as
vLLM does, so vLLM-style extras (`repetition_penalty=1`, `min_p=0`...) do not break clients.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labkit.engine.config import SamplingParams

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error a client should see: HTTP `status` plus the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str = "upstream_unavailable") -> APIError:
    """HTTP 503: a worker died, is down, or none is up for a role."""
    return APIError(503, message, type="service_unavailable_error", code=code)


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated `POST /v1/completions` body (one prompt, one choice)."""

    model: str | None
    prompt_text: str | None  # the prompt as text, when it came as text
    prompt_ids: tuple[int, ...] | None  # the prompt as token ids, when it came as ids
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (vLLM's -1 is accepted and means off)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    return_token_ids: bool = False  # vLLM extra: choices[0].token_ids and prompt_token_ids
    return_waterfall: bool = False  # lab extra: usage.waterfall, where the TTFT went (labkit.serve.waterfall)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.prompt_text is None) == (self.prompt_ids is None):
            raise ValueError("exactly one of prompt_text and prompt_ids must be set")

    def sampling(self) -> SamplingParams:
        """What a worker's engine needs of this request (stop strings are the router's: TextStream)."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
        )


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Body(BaseModel):
    """The body's scalar fields by JSON type (strictly: a bool is no number, 1.5 and "5" are no integer) and
    range; a null takes the default. The prompt, `stop` and token ids are checked below, against the vocabulary."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int = Field(16, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # at most the vocabulary
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: _StreamOptions | None = None
    return_token_ids: bool = False
    return_waterfall: bool = False


# Options this server does not implement: a value other than these (or null) is refused, not ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (0,),  # logprobs=null is fine; numbers other than 0 are not
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "suffix": ("",),
    "logit_bias": ({},),
}


def invalid(e: ValidationError, *, leaf: bool = True) -> APIError:
    """A pydantic validation error as the 400 naming the first bad field: `param` is that field's own name
    (`leaf`) or its top-level one; `code` says a malformed body, a wrong JSON type or a bad value."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    kind = err["type"]
    bad_type = kind.endswith("_type") or kind == "finite_number"
    code = "invalid_json" if kind == "json_invalid" else "invalid_type" if bad_type else "invalid_value"
    where = f"'{'.'.join(loc)}': " if loc else "the request body: "
    got = "" if kind in ("missing", "json_invalid") else f", got {json.dumps(err.get('input'), default=str)[:80]}"
    return bad_request(f"{where}{err['msg']}{got}", (loc[-1] if leaf else loc[0]) if loc else None, code)


def _token_ids(v: Any, name: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad_request(f"'{name}' must be a list of integer token ids", name, "invalid_type")
    bad = [t for t in v if t < 0 or t >= vocab_size]
    if bad:
        raise bad_request(f"'{name}' holds token id {bad[0]} outside the vocabulary [0, {vocab_size})", name)
    return tuple(v)


def _prompt(body: dict[str, Any], vocab_size: int) -> tuple[str | None, tuple[int, ...] | None]:
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("'prompt' is required", "prompt", "missing_required_parameter")
    p = body["prompt"]
    # OpenAI allows a batch: a list of strings or a list of token lists. One prompt only here.
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        if len(p) != 1:
            raise bad_request(
                f"'prompt' holds {len(p)} prompts; this server takes one prompt per request "
                "(send them as separate requests)",
                "prompt",
                "unsupported_value",
            )
        p = p[0]
    if isinstance(p, (str, list)) and not p:
        raise bad_request("'prompt' must not be empty", "prompt")
    if isinstance(p, str):
        return p, None
    if isinstance(p, list):
        return None, _token_ids(p, "prompt", vocab_size)
    raise bad_request(
        f"'prompt' must be a string or a list of token ids, got {type(p).__name__}", "prompt", "invalid_type"
    )


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    stop = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list) else None
    if stop is None or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS}", "stop")
    if not all(stop):
        raise bad_request("'stop' strings must not be empty", "stop")
    return stop


def parse_completion_request(
    body: Any, *, vocab_size: int, served_model_names: tuple[str, ...] = ()
) -> CompletionRequest:
    """Validates a decoded JSON body; returns the request or raises APIError (4xx)."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    try:
        b = _Body.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        raise invalid(e) from None
    if b.model is not None and served_model_names and b.model not in served_model_names:
        raise APIError(
            404,
            f"The model '{b.model}' does not exist; this server serves {list(served_model_names)}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    prompt_text, prompt_ids = _prompt(body, vocab_size)
    if b.top_k > vocab_size:
        raise bad_request(f"'top_k' must be at most the vocabulary size {vocab_size}, got {b.top_k}", "top_k")
    if b.stream_options is not None and not b.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise bad_request(
                f"'{name}'={json.dumps(body[name])} is not supported by this server "
                f"(allowed: {', '.join(json.dumps(a) for a in allowed)} or omit it)",
                name,
                "unsupported_value",
            )
    opts = b.stream_options or _StreamOptions()
    return CompletionRequest(
        **b.model_dump(exclude={"stream_options", "top_k"}),
        top_k=max(0, b.top_k),  # vLLM's -1 means off, as 0 does here
        prompt_text=prompt_text,
        prompt_ids=prompt_ids,
        stop=_stop(body.get("stop")),
        stop_token_ids=_token_ids(body.get("stop_token_ids") or [], "stop_token_ids", vocab_size),
        include_usage=opts.include_usage,
        continuous_usage_stats=opts.continuous_usage_stats,
        raw=body,
    )


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, waterfall: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAI usage block; `waterfall` (when asked for) rides in it as an extra field."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if waterfall is not None:
        out["waterfall"] = waterfall
    return out


def completion_response(
    cid: str,
    model: str,
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
    created: int | None = None,
    waterfall: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The non-streaming `text_completion` body."""
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        choice["prompt_token_ids"] = prompt_token_ids
    return {
        "id": cid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens, waterfall),
    }


def stream_chunk(
    cid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None = None,
    *,
    token_ids: list[int] | None = None,
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One SSE `text_completion` chunk with one choice."""
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    out: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out


def usage_chunk(cid: str, model: str, created: int, usage_: dict[str, Any]) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage`: no choices, the usage."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage_}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


def models_response(names: tuple[str, ...], max_model_len: int, root: str | None = None) -> dict[str, Any]:
    """`GET /v1/models`."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "labkit",
                "root": root or n,
                "max_model_len": max_model_len,
            }
            for n in names
        ],
    }
