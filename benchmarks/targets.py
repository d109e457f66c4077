"""The issues' speed targets, checked against a benchmark run's own figures.

`benchmarks/kernels.py` (issue 4) and `benchmarks/train_throughput.py` (issue 9) print their numbers
and then these lines: each target, what the run measured and whether it was met. The targets were
set for one H200, so on any other device the lines say they are there for comparison only.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET_DEVICE = "H200"


@dataclass(frozen=True)
class Check:
    what: str
    value: float
    limit: float
    unit: str  # printed after both numbers: "us", "%", "x its floor"
    at_least: bool = False  # the value must reach the limit (MFU) rather than stay under it
    digits: int = 1  # decimals printed (ratios near their limit need two)

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    def line(self) -> str:
        bound = ">=" if self.at_least else "<="
        return (f"  {'met   ' if self.met else 'MISSED'} {self.what}: {self.value:.{self.digits}f} {self.unit} "
                f"(target {bound} {self.limit:g})")


def print_checks(checks: list[Check], device_name: str) -> None:
    """The checks, one line each, under a heading that says where the targets hold."""
    if not checks:
        return
    where = ("" if TARGET_DEVICE in device_name
             else f"; they were set for an {TARGET_DEVICE}, so on {device_name} for comparison only")
    met = sum(check.met for check in checks)
    print(f"\ntargets: {met} of {len(checks)} met{where}")
    for check in checks:
        print(check.line())
