"""vLLM side by side with the lab: launch vLLM monolithic or prefill + decode (NixlConnector),
front it with the lab's router, read its NIXL metrics, check greedy equality with the lab's engine.

Nothing here imports vLLM itself: the servers are separate processes, so the lab runs (and
says how to add vLLM) where it is not installed. Modules: launch (start/stop servers),
pd_backend (the router's vLLM backend, `--backend vllm`), metrics (NIXL counters), greedy, bench
(the sweep's vLLM factory and the four-way comparison), bench_serve (`vllm bench serve` against
any URL), recipe (xPyD across machines), cli, tour.
"""

from __future__ import annotations

from labkit.vllm.launch import (
    VllmPD,
    VllmServer,
    VllmServerConfig,
    install_hint,
    launch_pd,
    vllm_available,
    vllm_version,
)

__all__ = ["VllmPD", "VllmServer", "VllmServerConfig", "install_hint", "launch_pd", "vllm_available", "vllm_version"]
