"""Serving: an OpenAI-compatible router in front of mono, or prefill + decode, worker processes.

    from labkit.serve.launcher import launch
    with launch("disagg", model="tiny", prefill_cpus=[0], decode_cpus=[1]) as srv:
        ...  # POST srv.url + "/v1/completions"

A request's path: router.py (the OpenAI edge: validate, tokenize, time, SSE) -> backend.py (which
worker, by routing.py's policy; retries; error mapping) -> prefill.py (run the prompt, send the KV)
-> labkit.transfer -> decode.py (receive, adopt, stream) -> back to the router. What travels
between them is a class of messages.py; every setting is a field of config.py.
"""

from __future__ import annotations
