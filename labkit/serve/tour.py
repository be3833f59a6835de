"""The tour's "Interference" section: the long-prefill stall in mono, mono + chunked prefill, and 1P1D.

Runs `labkit.serve.interference.run_modes` once per mode (each server started and stopped by
the launcher), adds the stall chart, the mono and 1P1D token timelines, a table and summary rows.
The ci profile uses `tiny` and a 1,536-token long prompt (about a minute and a half on 2 cores);
full uses `small` and 2,048 tokens.
"""
from __future__ import annotations

from typing import Any


def tour_section(report: Any, profile: str) -> None:
    """Adds the interference experiment to `report` (see the module doc)."""
    from labkit.plots import serving
    from labkit.serve.interference import InterferenceScenario, run_modes, stats_table

    s = report.sections[-1]
    model, long_tokens = ("tiny", 1536) if profile == "ci" else ("small", 2048)
    sc = InterferenceScenario(num_decodes=4, long_prompt_tokens=long_tokens, variant=1000)
    results = run_modes(model, sc, progress=True)
    by = {r.label: r for r in results}
    s.paragraphs.append(
        f"Four requests stream tokens from `{model}`; then one {long_tokens:,}-token prompt arrives. In one engine "
        "(mono) its prefill takes the step loop and every decode stalls for about as long as the prefill; chunked "
        "prefill cuts the stall into smaller ones; with the prefill on another worker (1P1D: prefill on core 0, "
        "decode on core 1) the decode gaps stay flat. Times are what the client saw.")
    s.tables.append(("Decode gaps around the long prefill (ms)", stats_table(results)))
    report.add_figure(s, serving.stall_comparison(results).figure, "interference_stalls",
                      "Mean decode gap outside the prefill vs the worst gap during it, per mode")
    for mode in ("mono", "1p1d"):
        report.add_figure(s, serving.interference_figure(by[mode]), f"interference_{mode}",
                          f"{mode}: every request's tokens as the client received them; red: the long prefill")
    st = {m: r.stats() for m, r in by.items()}
    report.add_summary("decode stall during a long prefill",
                       " / ".join(f"{m} {st[m]['decode_stall_max_ms']:,.0f} ms" for m in by),
                       f"{long_tokens:,}-token prompt, {model}")
    report.data["interference"] = [r.to_json() for r in results]
