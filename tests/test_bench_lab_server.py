"""The load generator and sweep against the lab's real servers (tiny model, mono and 1P1D)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from labkit.bench import SLO, synthetic
from labkit.bench.sweep import ModeSpec, SweepConfig, lab_server_factory, run_sweep
from labkit.proc import pid_alive


@pytest.mark.slow
def test_sweep_mono_and_1p1d_on_the_lab_server() -> None:
    pids: list[int] = []
    inner = lab_server_factory("tiny")

    @contextlib.contextmanager
    def factory(spec: ModeSpec) -> Iterator[str]:
        from labkit.serve import launcher

        real_launch = launcher.launch

        def spy(*a, **k):  # noqa: ANN002, ANN003 - records the PIDs the launcher started
            srv = real_launch(*a, **k)
            pids.extend(srv.pids)
            return srv

        launcher.launch = spy
        try:
            with inner(spec) as url:
                yield url
        finally:
            launcher.launch = real_launch

    w = synthetic("lab", (40, 120), (4, 12))
    cfg = SweepConfig(w, rates_rps=(4.0,), modes=("mono", "1p1d"), n_requests=6, warmup_requests=1,
                      slo=SLO(ttft_s=60.0), request_timeout_s=60.0, progress=False)
    res = run_sweep(cfg, factory)
    assert len(pids) == 2 + 3 and all(not pid_alive(p) for p in pids)  # router + workers, all gone
    for (mode, rate), run in res.runs.items():
        assert run.summary.sent == 6 == run.summary.ok, run.meta["first_errors"]
        for r in run.records:
            assert r.output_tokens == r.expected_output_tokens       # ignore_eos + max_tokens honoured
            assert len(r.itl_s) == r.output_tokens - 1
            assert r.prompt_tokens >= 40
    mono, pd = res.runs[("mono", 4.0)], res.runs[("1p1d", 4.0)]
    assert [r.prompt_tokens for r in mono.records] == [r.prompt_tokens for r in pd.records]
