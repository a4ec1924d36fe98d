"""Providers that wrap another provider: region aliases and a labelled fallback.

Both keep the wrapped provider's data untouched and only change *which* region is
asked. A fallback figure is never passed off as the real thing: it carries
``fallback=True``, the fallback region's name and a source suffixed
``(fallback for <region>)``.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Mapping

from orchestrator.carbon.base import Intensity, IntensityProvider, RegionStatus, unknown_region


class RegionMapProvider(IntensityProvider):
    """Asks the wrapped provider for ``mapping.get(region, region)``.

    Node labels rarely match a provider's names (a node labelled ``local`` or
    ``europe-west3`` is answered from the ``FR`` or ``DE`` trace); the returned
    :class:`Intensity` names the region it is really for.
    """

    def __init__(self, inner: IntensityProvider, mapping: Mapping[str, str]) -> None:
        self.inner = inner
        self.mapping = dict(mapping)
        self.name, self.remote = inner.name, inner.remote

    def intensity(self, region: str, start: datetime, end: datetime) -> Intensity:
        return self.inner.intensity(self.mapping.get(region, region), start, end)

    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        return self.inner.series(self.mapping.get(region, region), start, end, step_s)

    def regions(self) -> set[str] | None:
        known = self.inner.regions()
        if known is None:
            return None
        return known | {alias for alias, target in self.mapping.items() if target in known}

    def region_status(self, region: str) -> RegionStatus:
        return self.inner.region_status(self.mapping.get(region, region))


class FallbackProvider(IntensityProvider):
    """For a region the wrapped provider does not know, the *fallback_region*'s figure, labelled.

    Only regions the wrapped provider reports as unknown fall back; a window outside a
    trace or a failing API is still an error, never silently replaced.
    """

    def __init__(self, inner: IntensityProvider, fallback_region: str) -> None:
        if inner.region_status(fallback_region) == "unknown":
            raise unknown_region(
                fallback_region, inner.name, inner.regions() or set(), "carbon.fallback must name a region this provider knows"
            )
        self.inner = inner
        self.fallback_region = fallback_region
        self.name, self.remote = inner.name, inner.remote

    def intensity(self, region: str, start: datetime, end: datetime) -> Intensity:
        if self.inner.region_status(region) != "unknown":
            return self.inner.intensity(region, start, end)
        figure = self.inner.intensity(self.fallback_region, start, end)
        return dataclasses.replace(figure, fallback=True, source=f"{figure.source} (fallback for {region})")

    def series(self, region: str, start: datetime, end: datetime, step_s: float) -> list[float]:
        asked = self.fallback_region if self.inner.region_status(region) == "unknown" else region
        return self.inner.series(asked, start, end, step_s)

    def regions(self) -> set[str] | None:
        return self.inner.regions()

    def region_status(self, region: str) -> RegionStatus:
        status = self.inner.region_status(region)
        return "fallback" if status == "unknown" else status
