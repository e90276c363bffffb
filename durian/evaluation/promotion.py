"""The promotion rule: a candidate becomes champion only when it beats the champion.

Beating means strictly better on every primary metric; ties and missing (or non-finite)
metrics do not promote. With no champion yet, a candidate with all primary metrics promotes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    compared: dict[str, tuple[float | None, float | None]]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    primary: list[str],
    higher_is_better: bool = True,
) -> Decision:
    if not primary:
        raise ValueError("the promotion rule needs at least one primary metric")
    compared = {
        m: (candidate.get(m), None if champion is None else champion.get(m)) for m in primary
    }
    missing = [m for m in primary if not _finite(candidate.get(m))]
    if missing:
        return Decision(False, f"candidate lacks primary metric(s): {', '.join(missing)}", compared)
    if champion is None:
        return Decision(True, "no champion yet", compared)
    champion_missing = [m for m in primary if not _finite(champion.get(m))]
    if champion_missing:
        return Decision(
            False, f"champion lacks metric(s) {', '.join(champion_missing)}: cannot compare",
            compared,
        )
    sign = 1.0 if higher_is_better else -1.0
    not_better = [m for m in primary if sign * (candidate[m] - champion[m]) <= 0]
    if not_better:
        return Decision(False, f"not better on: {', '.join(not_better)}", compared)
    return Decision(True, f"better on all of: {', '.join(primary)}", compared)
