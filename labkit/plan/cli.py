"""`labkit plan`: should you disaggregate? The checklist, the verdict, the best P:D split, commands.

    labkit plan --workload azure-conv-2023 --devices 16 --link-gbps 100
    labkit plan --workload azure-code-2023 --devices 4 --link-gbps 25 --no-rdma --hardware "A100 80GB"
    labkit plan --workload azure-code-2023 --decode-hardware L40S --decode-price-per-device-hour 1.0
    labkit plan --calibration ~/.cache/labkit/plan/calibration-small-full.json --measured   # this machine

Without `--calibration` the latency model is a roofline of `--model` on `--hardware` (datasheet
peaks at the given MFU/MBU): an estimate. With one, the fitted model is used as measured, or
scaled to `--hardware` by datasheet ratios when `--measured-on` names the measuring device.
The search fills the device budget with units (idle devices count), draws the gain-vs-devices
curve from 1 to 64 devices, and with `--decode-hardware` also prices decode on another part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from labkit.models import PRESETS


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    w = parser.add_argument_group("workload")
    w.add_argument(
        "--workload", default="azure-conv-2023", help="preset from labkit.bench.workloads (default azure-conv-2023)"
    )
    w.add_argument("--prompt-tokens", type=float, default=None, help="override the median prompt length (tokens)")
    w.add_argument("--output-tokens", type=float, default=None, help="override the median output length (tokens)")
    w.add_argument("--prefix-hit-rate", type=float, default=None, help="override the prefix-cache hit rate (0..1)")
    c = parser.add_argument_group("cluster")
    c.add_argument("--devices", type=int, default=16, help="device budget (GPUs)")
    c.add_argument("--link-gbps", type=float, default=100.0, help="KV link between nodes, Gbit/s")
    c.add_argument("--link-latency-us", type=float, default=10.0, help="fixed cost of a transfer between nodes, µs")
    c.add_argument(
        "--intra-node-gbps", type=float, default=None, help="KV link inside a node, Gbit/s (default: NVLink 4, 3,600)"
    )
    c.add_argument("--rdma", action=argparse.BooleanOptionalAction, default=True, help="the link is RDMA (default yes)")
    c.add_argument("--price-per-device-hour", type=float, default=2.5, help="price of one device for one hour")
    c.add_argument(
        "--devices-per-node", type=int, default=8, help="a unit larger than this pays the link between nodes"
    )
    c.add_argument(
        "--decode-hardware",
        default=None,
        help="price decode on another part (data/datasheets.json): Splitwise's heterogeneous split",
    )
    c.add_argument("--decode-price-per-device-hour", type=float, default=None, help="price of one decode-part device")
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
    s.add_argument("--requests", type=int, default=1000, help="requests in the pool (more: slower, steadier)")
    s.add_argument("--max-unit", type=int, default=None, help="largest xPyD unit searched (devices; default two nodes)")
    s.add_argument("--curve-devices", type=int, default=64, help="draw the gain-vs-devices curve up to this many")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def _latency(args: argparse.Namespace):
    from labkit.plan.latency_model import Calibration
    from labkit.plan.scaling import (
        Efficiency,
        ModelShape,
        datasheet_spec,
        roofline_latency_model,
        scale_latency_model,
    )

    if args.calibration:
        cal = Calibration.load(args.calibration)
        if args.measured or not args.measured_on:
            return cal.model
        return scale_latency_model(
            cal.model, datasheet_spec(args.measured_on, args.dtype), datasheet_spec(args.hardware, args.dtype)
        )
    shape = ModelShape.from_preset(args.model, args.dtype)
    eff = Efficiency(args.mfu, args.mbu, args.step_overhead_ms / 1e3)
    return roofline_latency_model(shape, datasheet_spec(args.hardware, args.dtype), eff)


def run(args: argparse.Namespace) -> int:
    from labkit.links import LINKS, Link
    from labkit.plan.planner import plan
    from labkit.plan.search import Network, SearchSettings
    from labkit.plan.simulator import SLO, Limits
    from labkit.plan.workload import workload_shape

    try:
        shape = workload_shape(args.workload)
        changes = {
            k: v
            for k, v in (
                ("prompt_median_tokens", args.prompt_tokens),
                ("output_median_tokens", args.output_tokens),
                ("prefix_hit_rate", args.prefix_hit_rate),
            )
            if v is not None
        }
        shape = shape.with_(**changes) if changes else shape
        if args.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {args.devices}")
        if args.curve_devices < 1:
            raise ValueError(f"--curve-devices must be >= 1, got {args.curve_devices}")
        if args.decode_hardware and args.decode_price_per_device_hour is None:
            raise ValueError("--decode-hardware needs --decode-price-per-device-hour (the datasheets carry no prices)")
        latency = _latency(args)
        slo = SLO(args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
        inter = Link.from_gbps(args.link_gbps, args.link_latency_us * 1e-6)
        intra = (
            Link.from_gbps(args.intra_node_gbps, LINKS["nvlink"].fixed_s) if args.intra_node_gbps else LINKS["nvlink"]
        )
        if args.tp < 1 or args.devices_per_node % args.tp:
            raise ValueError(f"--tp {args.tp} must divide --devices-per-node {args.devices_per_node}")
        # the planner counts instances (one device each, or one TP group): a node holds devices_per_node / tp
        network = Network(inter, intra, args.devices_per_node // args.tp)
        limits = Limits(args.max_num_seqs, args.max_num_batched_tokens)
        settings = SearchSettings(attainment=args.attainment, max_unit_devices=args.max_unit)
        mix = _parts(args, shape, limits) if args.decode_hardware else None
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"labkit plan: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.json:
        print(
            f"simulating deployments of 1 to {max(args.devices, args.curve_devices)} devices ...",
            file=sys.stderr,
            flush=True,
        )
    rep = plan(
        shape,
        latency,
        devices=args.devices,
        slo=slo,
        network=network,
        rdma=args.rdma,
        limits=limits,
        price_per_device_hour=args.price_per_device_hour,
        num_requests=args.requests,
        settings=settings,
        model_id=args.served_model or args.model,
        tensor_parallel=args.tp,
        node_hosts=tuple(h for h in args.nodes.split(",") if h),
        curve_devices=args.curve_devices,
    )
    hetero = None
    if mix is not None:
        from labkit.plan.hetero import compare_parts
        from labkit.plan.workload import sample_requests

        hetero = compare_parts(
            sample_requests(shape, args.requests, 1.0),
            slo,
            *mix,
            network=network,
            prefix_hit_rate=shape.prefix_hit_rate,
            settings=settings,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "workload": shape.name,
                    "devices": args.devices,
                    "gain": rep.search.disagg_gain,
                    "verdict": rep.checklist.verdict,
                    "best_layout": rep.search.best.label,
                    "deployments": rep.deployment_rows(),
                    "checklist": rep.checklist.rows(),
                    "layouts": rep.table_rows(top=50),
                    "curve": rep.curve.rows(),
                    "heterogeneous": hetero.rows() if hetero is not None else None,
                    "latency_model": rep.latency.to_dict(),
                    "commands": rep.commands_one_node,
                },
                indent=1,
                default=str,
            )
        )
    else:
        print(rep.render())
        if hetero is not None:
            print("\n" + hetero.render())
        print(f"\n({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def _parts(args: argparse.Namespace, shape: Any, limits: Any) -> tuple[Any, Any]:
    """The prefill part (--hardware) and the decode part (--decode-hardware), from the datasheets."""
    from labkit.plan.hetero import part_from_datasheet
    from labkit.plan.scaling import Efficiency, ModelShape

    model = ModelShape.from_preset(args.model, args.dtype)
    eff = Efficiency(args.mfu, args.mbu, args.step_overhead_ms / 1e3)
    context = shape.mean_prompt_tokens + shape.mean_output_tokens
    return (
        part_from_datasheet(
            args.hardware, model, args.price_per_device_hour, efficiency=eff, limits=limits, context_tokens=context
        ),
        part_from_datasheet(
            args.decode_hardware,
            model,
            args.decode_price_per_device_hour,
            efficiency=eff,
            limits=limits,
            context_tokens=context,
        ),
    )
