"""Serving: an OpenAI-compatible router in front of mono, or prefill + decode, worker processes.

    from labkit.serve.launcher import launch
    with launch("disagg", model="tiny", prefill_cpus=[0], decode_cpus=[1]) as srv:
        ...  # POST srv.url + "/v1/completions"
"""
from __future__ import annotations
