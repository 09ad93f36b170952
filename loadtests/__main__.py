"""``python -m loadtests run ...``: flags and scenario to options, run, write the
report, the plots and print the summary table."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from modelpool.loadtests.client import RequestFailed
from modelpool.loadtests.options import (
    ARRIVALS,
    PROTOCOLS,
    LoadOptions,
    load_scenario,
    merge,
    merge_tenants,
    parse_models,
    parse_tenant,
)
from modelpool.loadtests.report import Report
from modelpool.loadtests.runner import run_load, stderr_progress

log = logging.getLogger("loadtests")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one open-loop load test and write DIR/report.json")
    run.add_argument("--url", required=True, help="HOST:PORT of the server's HTTP or gRPC endpoint")
    run.add_argument("--protocol", required=True, choices=PROTOCOLS)
    run.add_argument("--out", required=True, type=Path, help="directory for report.json and plots")
    run.add_argument(
        "--metrics-url",
        default=None,
        help="HOST:PORT of /metrics (default: the url's host, port + 2 for http, + 1 for grpc)",
    )
    run.add_argument("--scenario", default=None, help="JSON file, or a name in loadtests/scenarios")
    # Workload flags default to None so that only the ones given override a scenario.
    run.add_argument("--models", type=parse_models, default=None, help="auto (default) or a,b,c")
    run.add_argument("--duration", type=float, default=None, help="seconds of sending (default 30)")
    run.add_argument(
        "--rate", type=float, default=None, help="mean requests per second (default 50)"
    )
    run.add_argument("--zipf", type=float, default=None, help="popularity exponent (default 1.1)")
    run.add_argument("--tenants", type=int, default=None, help="tenants, each skewed its own way")
    run.add_argument(
        "--tenant",
        dest="tenant_specs",
        metavar="NAME:KEY:RATE",
        type=_tenant_arg,
        action="append",
        default=None,
        help="a keyed tenant with its own stream at RATE rps (repeatable; KEY may be empty "
        "for an open server; NAME:KEY: takes the scenario's rate or --rate). Over a "
        "scenario's tenant of that name it sets the key and rate",
    )
    run.add_argument("--arrival", choices=ARRIVALS, default=None, help="default poisson")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument(
        "--max-outstanding", type=int, default=None, help="in-flight cap (default 1000)"
    )
    run.add_argument("--timeout", type=float, default=None, help="seconds per request (default 30)")
    run.add_argument("--no-plots", action="store_true", help="write report.json only")
    run.add_argument("--quiet", action="store_true", help="no per-second progress lines")
    run.add_argument("--log-level", default="INFO")
    compare = sub.add_parser(
        "compare", help="modelpool against its peers: DIR/compare.json, .md and .png"
    )
    from modelpool.loadtests.compare import add_arguments as add_compare_arguments

    add_compare_arguments(compare)
    return parser


def _tenant_arg(text: str) -> object:
    try:
        return parse_tenant(text)
    except ValueError as e:
        # argparse prints this message, not the argument (it may hold a key).
        raise argparse.ArgumentTypeError(str(e)) from None


def options_from(args: argparse.Namespace) -> LoadOptions:
    scenario = load_scenario(args.scenario) if args.scenario else {}
    workload = {k: getattr(args, k) for k in (
        "models", "duration", "rate", "zipf", "tenants", "arrival", "seed", "max_outstanding", "timeout",
    )}  # fmt: skip
    if args.tenant_specs or "tenant_specs" in scenario:
        scenario["tenant_specs"] = merge_tenants(
            scenario.get("tenant_specs", ()), args.tenant_specs
        )
    target = {"url": args.url, "protocol": args.protocol, "metrics_url": args.metrics_url}
    return merge(target, scenario, workload)


async def _run(options: LoadOptions, quiet: bool) -> Report:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C ends the schedule early but still writes the report of what was sent.
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        return await run_load(options, progress=None if quiet else stderr_progress, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def write_outputs(report: Report, out: Path, plots: bool) -> Report:
    report.write(out)  # first, so a plotting failure cannot lose the figures
    if not plots:
        return report
    try:
        from modelpool.loadtests.plots import write_plots
    except ImportError as e:
        log.warning("no plots: %s (pip install modelpool[plots])", e)
        return report
    paths = write_plots(report, out)
    report = dataclasses.replace(report, plots=tuple(p.name for p in paths))
    report.write(out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "compare":
        from modelpool.loadtests.compare import main as compare_main

        return compare_main(args)
    try:
        options = options_from(args)
    except (ValueError, TypeError) as e:
        print(f"loadtests: {e}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run(options, args.quiet))
    except (RequestFailed, RuntimeError) as e:
        print(f"loadtests: cannot run against {options.url}: {e}", file=sys.stderr)
        return 1
    report = write_outputs(report, args.out, plots=not args.no_plots)
    print(report.table())
    print(
        f"wrote {args.out / 'report.json'}"
        + (f" and {len(report.plots)} plots" if report.plots else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
