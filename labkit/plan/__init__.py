"""Should you disaggregate? A latency model fitted on your measurements, a serving simulator,
a P:D search, cost, hardware scaling, the decision checklist and vLLM launch commands."""
from __future__ import annotations
