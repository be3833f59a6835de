"""`labkit plan`: should you disaggregate? The checklist, the verdict, the best P:D split, commands.

    labkit plan --workload azure-conv-2023 --devices 16 --link-gbps 100
    labkit plan --workload azure-code-2023 --devices 4 --link-gbps 25 --no-rdma --hardware "A100 80GB"
    labkit plan --calibration ~/.cache/labkit/plan/calibration-small-full.json --measured   # this machine

Without `--calibration` the latency model is a roofline of `--model` on `--hardware` (datasheet
peaks at the given MFU/MBU): an estimate. With one, the fitted model is used as measured, or
scaled to `--hardware` by datasheet ratios when `--measured-on` names the measuring device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from labkit.models import PRESETS


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", default="azure-conv-2023", help="preset from labkit.bench.workloads (default azure-conv-2023)")
    w.add_argument("--prompt-tokens", type=float, default=None, help="override the median prompt length (tokens)")
    w.add_argument("--output-tokens", type=float, default=None, help="override the median output length (tokens)")
    w.add_argument("--prefix-hit-rate", type=float, default=None, help="override the prefix-cache hit rate (0..1)")
    c = parser.add_argument_group("cluster")
    c.add_argument("--devices", type=int, default=16, help="device budget (GPUs)")
    c.add_argument("--link-gbps", type=float, default=100.0, help="KV link bandwidth between P and D, Gbit/s")
    c.add_argument("--link-latency-us", type=float, default=10.0, help="per-transfer latency, µs")
    c.add_argument("--rdma", action=argparse.BooleanOptionalAction, default=True, help="the link is RDMA (default yes)")
    c.add_argument("--price-per-device-hour", type=float, default=2.5, help="price of one device for one hour")
    c.add_argument("--devices-per-node", type=int, default=8)
    c.add_argument("--nodes", default="", help="comma-separated node addresses for the multi-node commands")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size of each instance")
    m = parser.add_argument_group("latency model")
    m.add_argument("--model", default="llama-3.1-8b", help=f"preset shape for the roofline ({', '.join(PRESETS)})")
    m.add_argument("--served-model", default=None, help="model id in the vllm commands (default: --model)")
    m.add_argument("--hardware", default="H100 SXM", help="device name in data/datasheets.json")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--mfu", type=float, default=0.5, help="prefill model-FLOPs utilization for the roofline")
    m.add_argument("--mbu", type=float, default=0.7, help="decode memory-bandwidth utilization for the roofline")
    m.add_argument("--step-overhead-ms", type=float, default=1.0, help="fixed cost of each engine step, ms")
    m.add_argument("--calibration", default=None, help="a calibration JSON (labkit.plan.calibrate) to use instead")
    m.add_argument("--measured-on", default=None, help="device the calibration was measured on: scale it to --hardware")
    m.add_argument("--measured", action="store_true", help="use the calibration as measured (no scaling)")
    s = parser.add_argument_group("SLO and search")
    s.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    s.add_argument("--tpot-slo-ms", type=float, default=50.0)
    s.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both SLOs")
    s.add_argument("--max-num-seqs", type=int, default=256, help="decode batch limit per instance")
    s.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per step")
    s.add_argument("--requests", type=int, default=600, help="requests per simulation (more: slower, steadier)")
    s.add_argument("--max-unit", type=int, default=8, help="largest xPyD unit searched (devices)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def _latency(args: argparse.Namespace):
    from labkit.plan.latency_model import Calibration
    from labkit.plan.scaling import (Efficiency, ModelShape, datasheet_spec, roofline_latency_model,
                                     scale_latency_model)

    if args.calibration:
        cal = Calibration.load(args.calibration)
        if args.measured or not args.measured_on:
            return cal.model
        return scale_latency_model(cal.model, datasheet_spec(args.measured_on, args.dtype),
                                   datasheet_spec(args.hardware, args.dtype))
    shape = ModelShape.from_preset(args.model, args.dtype)
    eff = Efficiency(args.mfu, args.mbu, args.step_overhead_ms / 1e3)
    return roofline_latency_model(shape, datasheet_spec(args.hardware, args.dtype), eff)


def run(args: argparse.Namespace) -> int:
    from labkit.plan.planner import plan
    from labkit.plan.search import SearchSettings
    from labkit.plan.simulator import SLO, Limits, Link
    from labkit.plan.workload import workload_shape

    try:
        shape = workload_shape(args.workload)
        changes = {k: v for k, v in (("prompt_median_tokens", args.prompt_tokens),
                                     ("output_median_tokens", args.output_tokens),
                                     ("prefix_hit_rate", args.prefix_hit_rate)) if v is not None}
        shape = shape.with_(**changes) if changes else shape
        if args.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {args.devices}")
        latency = _latency(args)
        slo = SLO(args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
        link = Link(args.link_gbps, args.link_latency_us * 1e-6)
        limits = Limits(args.max_num_seqs, args.max_num_batched_tokens)
        settings = SearchSettings(attainment=args.attainment,
                                  max_unit_devices=max(2, min(args.devices, args.max_unit, args.devices_per_node)))
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"labkit plan: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.json:
        print(f"simulating layouts for {args.devices} devices ...", file=sys.stderr, flush=True)
    rep = plan(shape, latency, devices=args.devices, slo=slo, link=link, rdma=args.rdma, limits=limits,
               price_per_device_hour=args.price_per_device_hour, num_requests=args.requests, settings=settings,
               model_id=args.served_model or args.model, tensor_parallel=args.tp,
               devices_per_node=args.devices_per_node,
               node_hosts=tuple(h for h in args.nodes.split(",") if h))
    if args.json:
        print(json.dumps({"workload": shape.name, "devices": args.devices, "gain": rep.search.disagg_gain,
                          "verdict": rep.checklist.verdict, "best_layout": rep.search.best.label,
                          "checklist": rep.checklist.rows(), "layouts": rep.table_rows(top=50),
                          "latency_model": rep.latency.to_dict(), "commands": rep.commands_one_node}, indent=1,
                         default=str))
    else:
        print(rep.render())
        print(f"\n({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
