"""Notebook 07's exercises: the two requests of vLLM's P/D protocol (two build-its, checked against
the router's own builders in `labkit.vllm.pd_backend`, then sent through the real prefill and
decode servers), the bytes NIXL moved (compute, against the decode server's counters), who moves
the KV (multiple choice, graded on both servers' counters), and what a repeated prompt moves
(predict, then measure)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from labkit.check import CheckResult, check_choice, check_close, verdict
from labkit.exercises.core import Example, exercise
from labkit.exercises.suite import Case, run_suite
from labkit.vllm.metrics import NixlStats
from labkit.vllm.pd_backend import PREFILL_KV_PARAMS, decode_body, prefill_body

# A prefill server's answer as vLLM 0.32's NixlConnector writes it (recorded on the 2-core CPU,
# 2026-12-01; prompt_token_ids and the id trimmed): where the decode server finds the KV.
PREFILL_ANSWER: dict[str, Any] = {
    "id": "cmpl-ba1b6346909dc596",
    "object": "text_completion",
    "model": "tiny",
    "choices": [{"index": 0, "text": "", "finish_reason": "length", "token_ids": [192]}],
    "usage": {"prompt_tokens": 301, "total_tokens": 302, "completion_tokens": 1},
    "kv_transfer_params": {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [[1, 2, 3]],
        "remote_engine_id": "b33d1ac0-9b09-46ec-a62f-e9564267204e",
        "remote_request_id": "cmpl-ba1b6346909dc596-0-ab272ec7",
        "remote_host": "127.0.0.1",
        "remote_port": 52515,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": 301,
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
        "remote_prefill_cached_tokens": 0,
    },
}


def example_bodies() -> list[dict[str, Any]]:
    """Completions requests as a client (or the router) sends them: plain, streaming, with a
    minimum length, with sampling settings and stops."""
    prompt = [256, 72, 101, 108, 108, 111]
    return [
        {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0.0},
        {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 64,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        },
        {
            "model": "tiny",
            "prompt": "Hello",
            "max_tokens": 32,
            "min_tokens": 8,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["\n\n"],
            "ignore_eos": False,
        },
    ]


def _call_on_copies(fn: Callable[..., Any], *args: Any) -> tuple[Any, bool]:
    """fn(*deep copies of args) and whether it changed any of them (the router reuses the body)."""
    copies = copy.deepcopy(args)
    out = fn(*copies)
    return out, json.dumps(copies, sort_keys=True, default=str) != json.dumps(args, sort_keys=True, default=str)


def _normal(d: dict[str, Any]) -> dict[str, Any]:
    """A request as vLLM reads it: no stream means stream false; stream_options only matter for
    streaming (what a server sends, not what it does), so they are left out."""
    out = {k: v for k, v in d.items() if k != "stream_options"}
    out["stream"] = bool(out.get("stream", False))
    return out


def _diff(got: dict[str, Any], want: dict[str, Any]) -> str:
    keys = sorted(set(got) | set(want), key=str)
    bad = [k for k in keys if got.get(k, "<missing>") != want.get(k, "<missing>")]
    return "; ".join(f"{k}: {got.get(k, '<missing>')!r}, expected {want.get(k, '<missing>')!r}" for k in bad[:3])


# --- Exercise 1 · the prefill request (build-it) ---------------------------------------------


def _new_dict(got: tuple[Any, bool]) -> tuple[dict[str, Any] | None, str]:
    """The request a builder returned (from `_call_on_copies`), or None and what is wrong with it."""
    out, mutated = got
    if mutated:
        return None, "changed what it was given: build a new dict (the router sends the body again to decode)"
    if not isinstance(out, dict):
        return None, f"returned {type(out).__name__}, expected the request as a dict"
    return out, ""


def _prefill_judge(got: Any, case: Case) -> tuple[bool, str]:
    out, problem = _new_dict(got)
    if out is None:
        return False, problem
    want = _normal(case.expected)
    mine = _normal(out)
    params = mine.pop("kv_transfer_params", None)
    want_params = want.pop("kv_transfer_params")
    if not isinstance(params, dict) or params.get("do_remote_decode") is not True or params.get("do_remote_prefill"):
        return False, (
            f"kv_transfer_params {params!r}: the prefill server must be told to keep the KV for a remote "
            f"decoder ({{'do_remote_decode': True, ...}}, as {want_params!r})"
        )
    if mine != want:
        return False, _diff(mine, want)
    return True, f"max_tokens {out['max_tokens']}, stream {mine['stream']}, kv_transfer_params {params}"


def _prefill_cases() -> Iterator[Case]:
    for i, body in enumerate(example_bodies()):
        label = ("a plain request", "a streaming request", "a request with min_tokens and sampling settings")[i]
        yield Case(label, (body,), prefill_body(body), judge=_prefill_judge)


def reference_prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The builder the learner writes (the tests' right answer)."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "min_tokens")}
    out.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    return out


def _prefill_examples() -> list[Example]:
    def full_length(b: dict[str, Any]) -> dict[str, Any]:
        return {**reference_prefill_request(b), "max_tokens": b["max_tokens"]}

    def keeps_stream(b: dict[str, Any]) -> dict[str, Any]:
        return {**reference_prefill_request(b), "stream": b.get("stream", False)}

    def in_place(b: dict[str, Any]) -> dict[str, Any]:
        b.pop("min_tokens", None)
        b.pop("stream_options", None)
        b.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
        return b

    def no_params(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in reference_prefill_request(b).items() if k != "kv_transfer_params"}

    def remote_prefill(b: dict[str, Any]) -> dict[str, Any]:
        return {**reference_prefill_request(b), "kv_transfer_params": {"do_remote_prefill": True}}

    def keeps_min(b: dict[str, Any]) -> dict[str, Any]:
        return {**reference_prefill_request(b), **({"min_tokens": b["min_tokens"]} if "min_tokens" in b else {})}

    return [
        Example(
            right=reference_prefill_request,
            wrong=[full_length, keeps_stream, in_place, no_params, remote_prefill, keeps_min],
        )
    ]


@exercise(
    "07",
    1,
    "the prefill request",
    kind="build-it",
    hint="a copy of the body with max_tokens 1, stream false (no stream_options, no min_tokens) and "
    "kv_transfer_params {'do_remote_decode': True}",
    examples=_prefill_examples,
)
def check_prefill_request(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> CheckResult:
    """Runs the learner's `prefill_request(body)` on three client requests. Expected: what the lab's
    router sends the prefill server (`labkit.vllm.pd_backend.prefill_body`), as vLLM reads it (no
    stream means false; the None fields of kv_transfer_params are optional); the body must not change."""
    return run_suite(
        "prefill_request", lambda body: _call_on_copies(fn, body), _prefill_cases(), hint=check_prefill_request.hint
    )


# --- Exercise 2 · the decode request (build-it, then live) -------------------------------------


def _decode_judge(got: Any, case: Case) -> tuple[bool, str]:
    out, problem = _new_dict(got)
    if out is None:
        return False, problem
    mine, want = _normal(out), _normal(case.expected)
    if mine != want:
        return False, _diff(mine, want)
    return (
        True,
        f"max_tokens {out.get('max_tokens')}, stream {mine['stream']}, kv_transfer_params from the prefill answer",
    )


def _decode_cases() -> Iterator[Case]:
    other = copy.deepcopy(PREFILL_ANSWER)
    other["kv_transfer_params"].update(remote_block_ids=[[7, 8]], remote_num_tokens=200, remote_port=40001)
    for i, (body, answer) in enumerate(zip(example_bodies(), (PREFILL_ANSWER, other, PREFILL_ANSWER))):
        label = ("a plain request", "a streaming request", "a request with min_tokens and sampling settings")[i]
        want = decode_body(body, answer["kv_transfer_params"], stream=bool(body.get("stream")))
        yield Case(label, (body, answer), want, judge=_decode_judge)


def reference_decode_request(body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
    """The builder the learner writes (the tests' right answer)."""
    return {**body, "kv_transfer_params": prefill_answer["kv_transfer_params"]}


def live_verdict(trace: Any, reference_tokens: list[int]) -> tuple[bool, str]:
    """Whether a live request built by the learner's functions moved its KV over NIXL (the decode
    server's counters) and decoded the same tokens as the router's own builders, and the details."""
    moved = trace.nixl_decode.transfers >= 1 and trace.nixl_decode.bytes_transferred > 0
    same = trace.tokens == list(reference_tokens)
    text = (
        f"the decode server read {trace.nixl_decode.transfers:.0f} NIXL transfer(s), "
        f"{trace.nixl_decode.bytes_transferred:,.0f} B; {len(trace.tokens)} tokens "
        f"{'equal to' if same else 'NOT equal to'} the router's path"
    )
    if not moved:
        text += " (no KV crossed: the decode server computed the prompt itself; are kv_transfer_params passed on?)"
    return moved and same, text


def _decode_examples() -> list[Example]:
    def whole_answer(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        return {**b, "kv_transfer_params": a}

    def no_params(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        return dict(b)

    def one_token(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        return {**reference_decode_request(b, a), "max_tokens": 1}

    def in_place(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        b["kv_transfer_params"] = a["kv_transfer_params"]
        return b

    def decode_again(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        return {**b, "kv_transfer_params": {**a["kv_transfer_params"], "do_remote_decode": True}}

    moved = _FakeTrace(NixlStats(transfers=1, bytes_transferred=1_572_864), [5, 6, 7])
    return [
        Example(
            right=reference_decode_request,
            wrong=[whole_answer, no_params, one_token, in_place, decode_again],
            label="recorded prefill answers",
        ),
        Example(
            right=reference_decode_request,
            wrong=[no_params, whole_answer],
            label="and a live request that moved its KV",
            context={"trace": moved, "reference_tokens": [5, 6, 7]},
        ),
    ]


class _FakeTrace:
    """What `live_verdict` reads of a PDTrace (for the examples: no server needed)."""

    def __init__(
        self, nixl_decode: NixlStats, tokens: list[int], nixl_prefill: NixlStats | None = None, answer_bytes: int = 1200
    ) -> None:
        self.nixl_decode, self.tokens = nixl_decode, tokens
        self.nixl_prefill = nixl_prefill or NixlStats()
        self.prefill_answer_bytes = answer_bytes


@exercise(
    "07",
    2,
    "the decode request",
    kind="build-it",
    hint="the original body (all of it: max_tokens, stream, ...) plus kv_transfer_params copied from the "
    "prefill server's answer (its 'kv_transfer_params' field, not the whole answer)",
    examples=_decode_examples,
)
def check_decode_request(
    fn: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
    *,
    trace: Any = None,
    reference_tokens: list[int] | None = None,
) -> CheckResult:
    """Runs the learner's `decode_request(body, prefill_answer)` on three requests and recorded prefill
    answers. Expected: the router's decode request (`labkit.vllm.pd_backend.decode_body`). With `trace`
    (a live request the lab sent with the learner's two builders) and `reference_tokens` (the same
    prompt through the router's builders), it then asks the servers too: the decode server's NIXL
    counters must show the KV read, and the tokens must equal the router's path."""
    suite = run_suite(
        "decode_request",
        lambda body, answer: _call_on_copies(fn, body, answer),
        _decode_cases(),
        hint=check_decode_request.hint,
    )
    if trace is None or not suite:
        return suite
    ok, text = live_verdict(trace, reference_tokens or [])
    return verdict(
        ok,
        f"{'✅' if ok else '❌'} your two requests, live: {text}."
        + ("" if ok else f" Hint: {check_decode_request.hint}"),
    )


# --- Exercise 3 · the bytes NIXL moved (compute) ----------------------------------------------


def reference_nixl_bytes(prompt_tokens: int, block_tokens: int, kv_bytes_per_token: int) -> int:
    """Whole blocks of the prompt, every layer's K and V (the tests' right answer)."""
    return math.ceil(prompt_tokens / block_tokens) * block_tokens * kv_bytes_per_token


def _nixl_examples() -> list[Example]:
    measured = 1_572_864.0  # the committed-size answer: tiny, fp32, 301 tokens, 128-token blocks
    right = reference_nixl_bytes(301, 128, 4096)
    return [
        Example(
            right=right,
            wrong=[301 * 4096, right // 2, right * 8, 2 * 128 * 4096],
            context={"measured_bytes": measured},
            label="tiny on the 2-core CPU",
        )
    ]


@exercise(
    "07",
    3,
    "the bytes NIXL moved",
    kind="compute",
    hint="vLLM moves whole KV blocks: round the prompt's tokens up to a multiple of the block size, "
    "times the KV bytes per token",
    examples=_nixl_examples,
)
def check_nixl_bytes(answer: Any, *, measured_bytes: float) -> CheckResult:
    """The learner's byte count for one request's KV against what the decode server's NIXL counters
    (`vllm:nixl_bytes_transferred`) say it read for that request (1%: the count is exact)."""
    return check_close(
        "bytes NIXL moved for the request", answer, measured_bytes, rtol=0.01, unit="B", hint=check_nixl_bytes.hint
    )


# --- Exercise 4 · who moves the KV (multiple choice) -------------------------------------------


def kv_path_options(trace: Any) -> dict[str, tuple[str, bool]]:
    """The options of exercise 4, each with whether the request's counters support it."""
    pulled = trace.nixl_decode.transfers >= 1 and trace.nixl_prefill.transfers == 0
    kv_bytes = trace.nixl_decode.bytes_transferred
    return {
        "a": (
            "The prefill server pushes the KV into the decode server as soon as the prompt is done.",
            trace.nixl_prefill.transfers >= 1,
        ),
        "b": (
            (
                "The decode server reads the blocks out of the prefill server's memory when the decode request "
                "arrives; the prefill server's answer only says where they are."
            ),
            bool(pulled and trace.prefill_answer_bytes < 0.01 * kv_bytes),
        ),
        "c": (
            "The KV travels in the prefill server's HTTP answer, and whoever holds the answer hands it on.",
            bool(kv_bytes and trace.prefill_answer_bytes >= kv_bytes),
        ),
    }


def _kv_path_examples() -> list[Example]:
    pull = _FakeTrace(NixlStats(transfers=1, bytes_transferred=1_572_864), [1], answer_bytes=3_000)
    return [Example(right="b", wrong=["a", "c"], context={"trace": pull}, label="counters of a pulled request")]


@exercise(
    "07",
    4,
    "who moves the KV",
    kind="multiple-choice",
    hint="compare the NIXL counters of the two servers over the request, and the size of the prefill "
    "server's answer with the KV bytes",
    examples=_kv_path_examples,
)
def check_who_moves_kv(answer: Any, *, trace: Any) -> CheckResult:
    """The sentence the request's own data supports (each option evaluated on its counters); fails
    loudly if the data no longer singles out exactly one."""
    truth = [k for k, (_, ok) in kv_path_options(trace).items() if ok]
    if len(truth) != 1:
        raise RuntimeError(f"this request's counters support options {truth}, not exactly one: is the pair moving KV?")
    guess = answer.strip().lower()[:1] if isinstance(answer, str) else answer
    return check_choice("how the KV got to the decode server", guess, truth[0], hint=check_who_moves_kv.hint)


# --- Exercise 5 · the same prompt again (predict, then measure) --------------------------------


def reference_repeat_bytes(prompt_tokens: int, block_tokens: int, kv_bytes_per_token: int) -> int:
    """The decode server kept the full blocks of the first request in its prefix cache: only the
    last, partial block crosses again (the tests' right answer)."""
    full = prompt_tokens // block_tokens
    return (math.ceil(prompt_tokens / block_tokens) - full) * block_tokens * kv_bytes_per_token


def _repeat_examples() -> list[Example]:
    right = reference_repeat_bytes(301, 128, 4096)
    return [
        Example(
            right=right,
            wrong=[reference_nixl_bytes(301, 128, 4096), 0, 45 * 4096],
            context={"measured_bytes": 524_288.0},
            label="tiny on the 2-core CPU",
        )
    ]


@exercise(
    "07",
    5,
    "the same prompt again",
    kind="predict-then-measure",
    hint="the decode server caches the full blocks it adopted (prefix caching): which blocks of the prompt "
    "does it still lack?",
    examples=_repeat_examples,
)
def check_repeat_bytes(answer: Any, *, measured_bytes: float) -> CheckResult:
    """The learner's prediction (made before the repeat was sent) against the NIXL bytes the decode
    server read for the same prompt sent again (1%)."""
    return check_close(
        "bytes NIXL moved for the repeated prompt",
        answer,
        measured_bytes,
        rtol=0.01,
        unit="B",
        hint=check_repeat_bytes.hint,
    )


def nixl_table(traces: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per request: prompt tokens, NIXL transfers, bytes and time on both servers."""
    return [
        {
            "request": name,
            "prompt tokens": t.prompt_tokens,
            "prefill hop (ms)": round(t.prefill_s * 1e3, 1),
            "decode hop (ms)": round(t.decode_s * 1e3, 1),
            "decode server: NIXL reads": t.nixl_decode.transfers,
            "bytes": int(t.nixl_decode.bytes_transferred),
            "transfer ms": round(t.nixl_decode.xfer_time_s * 1e3, 1),
            "prefill server: NIXL reads": t.nixl_prefill.transfers,
            "prefill answer (B)": t.prefill_answer_bytes,
        }
        for name, t in traces.items()
    ]


__all__ = [
    "PREFILL_ANSWER",
    "PREFILL_KV_PARAMS",
    "check_decode_request",
    "check_nixl_bytes",
    "check_prefill_request",
    "check_repeat_bytes",
    "check_who_moves_kv",
    "example_bodies",
    "kv_path_options",
    "live_verdict",
    "nixl_table",
]
