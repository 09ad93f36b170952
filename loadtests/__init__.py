"""Open-loop load generator for modelpool (or any KServe v2 / Triton server).

    python -m loadtests run --url 127.0.0.1:8001 --protocol grpc --duration 60 \\
        --rate 200 --zipf 1.1 --out results/

From Python (other benchmarks)::

    from modelpool.loadtests import LoadOptions, run_load
    report = await run_load(LoadOptions(url="127.0.0.1:8001", protocol="grpc", duration=10))
    print(report.to_json())
"""

from modelpool.loadtests.options import LoadOptions
from modelpool.loadtests.report import Report
from modelpool.loadtests.runner import run_load

__all__ = ["LoadOptions", "Report", "run_load"]
