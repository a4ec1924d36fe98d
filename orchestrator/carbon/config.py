"""The ``carbon:`` section of a sweep spec, the provider factory and the spec-time region check.

::

    carbon:
      provider: static                      # static | timeseries | electricitymaps | watttime
      table: ../clusters/carbon/regions.csv # static only; default: the shipped table
      data_dir: ../clusters/carbon          # timeseries only; default: the shipped traces
      replay: true                          # timeseries only: replay 2020 onto other years
      fallback: world                       # optional: region used (labelled) for unknown regions
      regions: {local: FR}                  # optional: node region label -> provider region
      base_url: https://...                 # electricitymaps / watttime only (tests, proxies)
      timeout_s: 10                         # electricitymaps / watttime only: socket timeout

The section is parsed once, at the edge, into a frozen :class:`CarbonConfig`; relative
paths resolve against the spec's directory, like every other path in a spec. Credentials
never appear in a spec: the HTTP providers read them from the environment when
:func:`make_provider` builds them, and a missing variable is named in the error.

Before any work starts the coordinator calls :func:`check_regions` with the region label
of every node it may use: an unknown region without a fallback stops the sweep there,
not after hours of training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from orchestrator.carbon import electricitymaps, watttime
from orchestrator.carbon.base import CarbonDataError, IntensityProvider, describe_known, unknown_region
from orchestrator.carbon.static import DATA_DIR, DEFAULT_TABLE, StaticTableProvider
from orchestrator.carbon.timeseries import DEFAULT_LABEL, TimeSeriesProvider
from orchestrator.carbon.wrappers import FallbackProvider, RegionMapProvider

ProviderName = Literal["static", "timeseries", "electricitymaps", "watttime"]
HTTP_PROVIDERS = ("electricitymaps", "watttime")


class CarbonConfig(BaseModel):
    """Validated, frozen ``carbon:`` section. Build it with :func:`parse_carbon_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderName = "static"
    table: Path | None = None
    data_dir: Path | None = None
    replay: StrictBool = False
    fallback: str | None = Field(None, min_length=1)
    regions: dict[str, str] = Field(default_factory=dict)
    base_url: str | None = Field(None, min_length=1)
    timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: dict[str, str]) -> dict[str, str]:
        if any(not alias or not target for alias, target in v.items()):
            raise ValueError("region names must be non-empty")
        return v

    @model_validator(mode="after")
    def _provider_options(self) -> CarbonConfig:
        only = {
            "table": ("static",),
            "data_dir": ("timeseries",),
            "replay": ("timeseries",),
            "base_url": HTTP_PROVIDERS,
            "timeout_s": HTTP_PROVIDERS,
        }
        for key, providers in only.items():
            if key in self.model_fields_set and self.provider not in providers:
                raise ValueError(f"'{key}' applies only to provider {' or '.join(providers)}, not {self.provider} -- remove it")
        return self


def parse_carbon_config(raw: Any, *, base_dir: Path | str = ".") -> CarbonConfig:
    """Validate the ``carbon:`` mapping (None: all defaults) and resolve its paths.

    Every problem is one :class:`CarbonDataError` line naming the field and the fix.
    """
    if raw is None:
        return CarbonConfig()
    if not isinstance(raw, Mapping):
        raise CarbonDataError("carbon: must be a mapping such as {provider: static} -- see docs/carbon.md")
    try:
        config = CarbonConfig.model_validate(dict(raw))
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(part) for part in ("carbon", *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = "unknown provider; use one of static, timeseries, electricitymaps, watttime"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown key; allowed: {', '.join(CarbonConfig.model_fields)}"
        got = f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "missing") and "input" in err else ""
        if isinstance(err.get("input"), bool) and err["type"] == "string_type":
            got += "; YAML reads NO, yes, on, off as booleans -- quote the region name"
        raise CarbonDataError(f"{where}: {msg}{got}") from None
    base = Path(base_dir)
    resolved: dict[str, Path] = {}
    for key, must_be in (("table", "file"), ("data_dir", "directory")):
        value: Path | None = getattr(config, key)
        if value is None:
            continue
        path = (base / value).resolve()
        if not (path.is_file() if must_be == "file" else path.is_dir()):
            raise CarbonDataError(
                f"carbon.{key}: {must_be} not found: {path} -- fix the path (relative paths start at the spec's directory)"
            )
        resolved[key] = path
    return config.model_copy(update=resolved) if resolved else config


def make_provider(config: CarbonConfig, *, env: Mapping[str, str] = os.environ) -> IntensityProvider:
    """The provider *config* describes, wrapped for ``regions`` aliases and a ``fallback``.

    Reads tables and traces now (so bad data fails before work starts) and credentials
    from *env* (so a missing one is named now). Makes no network call.
    """
    provider: IntensityProvider
    if config.provider == "static":
        provider = StaticTableProvider(config.table or DEFAULT_TABLE)
    elif config.provider == "timeseries":
        data_dir = (config.data_dir or DATA_DIR).resolve()
        label = DEFAULT_LABEL if data_dir == DATA_DIR.resolve() else data_dir.name
        provider = TimeSeriesProvider.from_dir(data_dir, label=label, replay=config.replay)
    elif config.provider == "electricitymaps":
        provider = electricitymaps.ElectricityMapsProvider.from_env(
            env, base_url=config.base_url or electricitymaps.DEFAULT_BASE_URL, timeout_s=config.timeout_s
        )
    else:
        provider = watttime.WattTimeProvider.from_env(
            env, base_url=config.base_url or watttime.DEFAULT_BASE_URL, timeout_s=config.timeout_s
        )
    for alias, target in config.regions.items():
        if provider.region_status(target) == "unknown":
            raise unknown_region(target, provider.name, provider.regions() or set(), f"fix carbon.regions.{alias}")
    if config.fallback is not None:
        provider = FallbackProvider(provider, config.fallback)
    if config.regions:
        provider = RegionMapProvider(provider, config.regions)
    return provider


def check_regions(provider: IntensityProvider, regions: Iterable[str]) -> list[str]:
    """Fail before any work if a node region has no figure; return the regions served by the fallback.

    Call it with the ``greensweep/region`` label of every node the sweep may use.
    Regions a remote provider cannot check offline pass (their errors come at query
    time). The returned regions (sorted) will get labelled fallback figures: worth a
    warning line.
    """
    statuses = {region: provider.region_status(region) for region in regions}
    unknown = sorted(region for region, status in statuses.items() if status == "unknown")
    if len(unknown) == 1:
        fix = "add it to the provider's data, map it with carbon.regions, or set carbon.fallback"
        raise unknown_region(unknown[0], provider.name, provider.regions() or set(), fix)
    if unknown:
        raise CarbonDataError(
            f"carbon: unknown regions {', '.join(repr(r) for r in unknown)} for provider {provider.name} "
            f"(known: {describe_known(provider.regions() or set())}) -- "
            "add them to the provider's data, map them with carbon.regions, or set carbon.fallback"
        )
    return sorted(region for region, status in statuses.items() if status == "fallback")
