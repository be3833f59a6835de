"""`labkit vllm ...`: start vLLM mono or P/D behind the lab's router, read NIXL metrics, check
greedy equality with the lab's engine, print the multi-node recipe.

    labkit vllm serve --mode pd --model tiny          # prefill + decode + router; Ctrl-C stops all
    labkit vllm metrics http://127.0.0.1:8200         # NIXL totals of a decode server
    labkit vllm greedy --model tiny                   # lab engine vs vLLM, token by token
    labkit vllm recipe --prefill-hosts p1 --decode-hosts d1 d2 --model /models/llama
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import replace
from typing import Any


def _base(a: argparse.Namespace) -> Any:
    from labkit.vllm.launch import VllmServerConfig, default_device

    return VllmServerConfig(
        model=a.model,
        device=a.device or default_device(),
        dtype=a.dtype,
        max_model_len=a.max_model_len,
        kv_cache_gib=a.kv_cache_gib,
    )


def _serve(a: argparse.Namespace) -> int:
    from labkit import deployments
    from labkit.serve.launcher import start_router
    from labkit.vllm.launch import install_hint, launch, launch_pd, vllm_available

    if not vllm_available():
        print(install_hint(), file=sys.stderr)
        return 2
    base = _base(a)
    print(f"starting vLLM {a.mode} on {a.model} ({base.device}); this takes about a minute...", flush=True)
    dep = deployments.begin(f"vllm-{a.mode}", a.model)  # the servers and the router: one deployment
    servers = launch_pd(base).servers if a.mode == "pd" else [launch(replace(base, role="mono"))]
    router = None
    try:
        for s in servers:
            print(f"  vLLM {s.cfg.role:7s} {s.url}  pid {s.pid}  cores {s.cfg.cpus or 'all'}  log {s.log_path}")
        pd = a.mode == "pd"
        router = start_router(
            model=a.model,
            backend="vllm",
            port=a.port or None,
            mono=[] if pd else [servers[0].url],
            prefill=[servers[0].url] if pd else [],
            decode=[servers[1].url] if pd else [],
        )
        print(f"router (the URL to use): {router.url}  pid {router.pid}\nCtrl-C stops everything.", flush=True)
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        while not stop["now"] and all(s.child.alive() for s in servers) and router.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        deployments.end(dep)
        if router is not None:
            router.stop()
        left = [p for s in servers for p in s.stop()]
        print("stopped" + (f"; still alive: {left}" if left else ", every PID gone"))
    return 0


def _metrics(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from labkit.vllm.metrics import read_nixl, read_server

    print(json.dumps({"nixl": read_nixl(a.url).as_dict(), "server": asdict(read_server(a.url))}, indent=1))
    return 0


def _greedy(a: argparse.Namespace) -> int:
    import random

    from labkit.vllm.greedy import check_greedy
    from labkit.vllm.launch import install_hint, launch, vllm_available

    if not vllm_available() and not a.url:
        print(install_hint(), file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(16, 200))] for _ in range(a.prompts)]
    server = None
    url = a.url
    if not url:
        server = launch(replace(_base(a), role="mono", device="cpu"))
        url = server.url
    try:
        results = check_greedy(url, prompts, a.max_tokens, model=a.model)
    finally:
        if server is not None:
            server.stop()
    for r in results:
        print(json.dumps(r.as_row()))
    ok = all(r.equal for r in results)
    print("greedy equality:", "holds" if ok else "BROKEN (a token differs before any near tie)")
    return 0 if ok else 1


def _recipe(a: argparse.Namespace) -> int:
    from labkit.vllm.recipe import XPyDPlan, recipe_text

    print(
        recipe_text(
            XPyDPlan(
                a.model,
                tuple(a.prefill_hosts),
                tuple(a.decode_hosts),
                gpus_per_node=a.gpus_per_node,
                prefill_tp=a.prefill_tp,
                decode_tp=a.decode_tp,
                ucx_net_devices=a.ucx_net_devices,
            )
        )
    )
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tiny", help="labkit preset or HF model dir (default: tiny)")
        p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when a GPU is seen")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--max-model-len", type=int, default=1024)
        p.add_argument("--kv-cache-gib", type=int, default=1, help="CPU: KV cache per server, GiB")

    s = sub.add_parser("serve", help="start vLLM mono or prefill+decode, and the lab's router in front")
    common(s)
    s.add_argument("--mode", choices=["mono", "pd"], default="pd")
    s.add_argument("--port", type=int, default=0, help="router port (default: a free one)")
    s.set_defaults(func=_serve)

    m = sub.add_parser("metrics", help="NIXL and request totals of a running vLLM server")
    m.add_argument("url")
    m.set_defaults(func=_metrics)

    g = sub.add_parser("greedy", help="greedy tokens: the lab's engine vs vLLM, with near ties reported")
    common(g)
    g.add_argument("--url", default=None, help="a running vLLM server (default: start one)")
    g.add_argument("--prompts", type=int, default=4)
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_greedy)

    r = sub.add_parser("recipe", help="print the commands for xPyD across machines (UCX/RDMA)")
    r.add_argument("--model", required=True)
    r.add_argument("--prefill-hosts", nargs="+", required=True)
    r.add_argument("--decode-hosts", nargs="+", required=True)
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument("--prefill-tp", type=int, default=1)
    r.add_argument("--decode-tp", type=int, default=1)
    r.add_argument("--ucx-net-devices", default="all")
    r.set_defaults(func=_recipe)
