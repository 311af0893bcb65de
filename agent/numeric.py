"""Numerical helpers shared by the attribution engine and the simulated load."""

from __future__ import annotations


class CompensatedSum:
    """Neumaier summation: a running sum of values that are added and later removed again
    (rates of requests starting and ending) leaves no floating-point residue behind."""

    __slots__ = ("_comp", "_sum")

    def __init__(self) -> None:
        self._sum = self._comp = 0.0

    def add(self, x: float) -> None:
        total = self._sum + x
        if abs(self._sum) >= abs(x):
            self._comp += (self._sum - total) + x
        else:
            self._comp += (x - total) + self._sum
        self._sum = total

    @property
    def value(self) -> float:
        return self._sum + self._comp

    def clear(self) -> None:
        self._sum = self._comp = 0.0
