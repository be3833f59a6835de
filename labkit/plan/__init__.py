"""Should you disaggregate? A latency model fitted on your measurements, a serving simulator (mono,
mono-dp, xPyD, selective xPyD, decode on another part), the search that fills N devices with units,
the gain-vs-devices curve, cost, hardware scaling, the decision checklist, vLLM launch commands, and
the simulator's report card against measured runs."""

from __future__ import annotations
