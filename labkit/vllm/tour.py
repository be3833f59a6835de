"""The tour's vLLM section: vLLM P/D on the lab's router, NIXL counters, greedy equality.

Wire it into labkit/tour.py's SECTIONS as ("vLLM side by side", "labkit.vllm.tour:tour_section").
Without vLLM the section says how to add it and returns.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import httpx

from labkit.report import Report


def _token_ids(client: httpx.Client, url: str, body: dict[str, Any]) -> list[int]:
    """The completion's token ids; an error answer is raised with its status and message."""
    r = client.post(url + "/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered HTTP {r.status_code}: {r.text[:400]}")
    return r.json()["choices"][0]["token_ids"]


def tour_section(report: Report, profile: str) -> None:
    from labkit.serve.launcher import start_router
    from labkit.vllm.greedy import check_greedy
    from labkit.vllm.launch import VllmServerConfig, install_hint, pd_configs, start_server, vllm_available
    from labkit.vllm.metrics import read_nixl
    from labkit.vllm.procinfo import cpu_list_str

    sec = report.sections[-1]
    if not vllm_available():
        sec.paragraphs.append(install_hint())
        report.add_summary("vLLM", "not installed", "make vllm")
        return
    n = 8 if profile == "ci" else 32
    base = VllmServerConfig(model="tiny", max_model_len=1024, startup_timeout_s=600)
    p_cfg, d_cfg = pd_configs(base)
    servers = [start_server(c) for c in (p_cfg, d_cfg, replace(base, role="mono"))]
    router = None
    try:
        for s in servers:
            s.wait_ready()
        p, d, mono = servers
        router = start_router(model="tiny", prefill=[p.url], decode=[d.url], backend="vllm")
        rng = random.Random(profile)
        prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(40, 400))] for _ in range(n)]
        before = read_nixl(d.url)
        same = 0
        with httpx.Client(timeout=300) as client:
            for pr in prompts:
                body: dict[str, Any] = {
                    "model": "tiny",
                    "prompt": pr,
                    "max_tokens": 16,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                }
                same += _token_ids(client, router.url, body) == _token_ids(client, mono.url, body)
        nixl = read_nixl(d.url) - before
        greedy = check_greedy(mono.url, prompts[:4], 16, model="tiny")
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()
    sec.paragraphs.append(
        f"vLLM prefill (cores {cpu_list_str(p_cfg.cpus or ())}) and decode (cores "
        f"{cpu_list_str(d_cfg.cpus or ())}) with NixlConnector "
        f"behind the lab's router: {n} requests, {same} identical to vLLM monolithic."
    )
    sec.tables.append(("NIXL reads on the decode server", [{k: round(v, 4) for k, v in nixl.as_dict().items()}]))
    sec.tables.append(("Greedy equality, lab engine vs vLLM", [g.as_row() for g in greedy]))
    report.add_summary(
        "vLLM P/D = mono",
        f"{same}/{n} requests",
        f"{nixl.transfers:.0f} NIXL reads, "
        f"{nixl.mean_bytes / 2**20:.2f} MiB, {nixl.mean_xfer_time_s * 1e3:.1f} ms each",
    )
    report.add_summary(
        "greedy lab = vLLM",
        "yes" if all(g.equal for g in greedy) else "NO",
        f"near ties: {sum(len(g.near_ties) for g in greedy)}",
    )
    report.data["vllm"] = {"same": same, "n": n, "nixl": nixl.as_dict(), "greedy": [g.as_row() for g in greedy]}
