"""Carbon intensity: providers (static table, hourly traces, Electricity Maps, WattTime),
the labelled fallback, the ``carbon:`` spec section and the grams formula.

The coordinator's whole use of this package::

    config = parse_carbon_config(raw_spec.get("carbon"), base_dir=spec_dir)
    provider = make_provider(config)                 # reads data and credentials now
    fallback_regions = check_regions(provider, node_regions)   # before any work
    figure = provider.intensity(node_region, window_start, window_end)
    grams = carbon_g(energy_j, figure)               # store grams with figure's value, source, kind

The carbon placer reads hourly series through a :class:`SeriesCache` (per region and
hour, refreshed off the dispatch path, stale or fallback values labelled); the HTTP
providers retry 429/5xx under a :class:`RetryPolicy`.

See docs/carbon.md.
"""

from orchestrator.carbon.base import (
    CarbonDataError,
    CarbonProviderError,
    Intensity,
    IntensityProvider,
    Kind,
    RegionStatus,
    UnknownRegionError,
    carbon_g,
)
from orchestrator.carbon._http import RetryPolicy
from orchestrator.carbon.cache import SeriesCache, SeriesView
from orchestrator.carbon.config import CarbonConfig, check_regions, make_provider, parse_carbon_config
from orchestrator.carbon.electricitymaps import ElectricityMapsProvider
from orchestrator.carbon.static import StaticTableProvider
from orchestrator.carbon.timeseries import TimeSeriesProvider
from orchestrator.carbon.watttime import WattTimeProvider
from orchestrator.carbon.wrappers import FallbackProvider, RegionMapProvider

__all__ = [
    "CarbonConfig",
    "CarbonDataError",
    "CarbonProviderError",
    "ElectricityMapsProvider",
    "FallbackProvider",
    "Intensity",
    "IntensityProvider",
    "Kind",
    "RegionMapProvider",
    "RegionStatus",
    "RetryPolicy",
    "SeriesCache",
    "SeriesView",
    "StaticTableProvider",
    "TimeSeriesProvider",
    "UnknownRegionError",
    "WattTimeProvider",
    "carbon_g",
    "check_regions",
    "make_provider",
    "parse_carbon_config",
]
