"""orchestrator.carbon without a network: the contract, the static table, the hourly
traces (alignment, time weighting, replay), the wrappers and the ``carbon:`` config.

The HTTP providers are tested against a local server in test_carbon_http.py.
"""

from __future__ import annotations

import csv
import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from orchestrator.carbon import (
    CarbonConfig,
    CarbonDataError,
    FallbackProvider,
    Intensity,
    RegionMapProvider,
    StaticTableProvider,
    TimeSeriesProvider,
    UnknownRegionError,
    carbon_g,
    check_regions,
    make_provider,
    parse_carbon_config,
)
from orchestrator.carbon.base import step_windows, window_mean
from orchestrator.carbon.static import DATA_DIR, DEFAULT_TABLE, load_table
from orchestrator.carbon.timeseries import DEFAULT_LABEL, load_trace
from orchestrator.errors import GreensweepError

UTC = timezone.utc
REPO = Path(__file__).resolve().parents[2]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def trace_value(region: str, when: str) -> float:
    """The published value of the shipped trace at ISO hour *when* (read straight from the CSV)."""
    with (DATA_DIR / f"{region}-2020-hourly.csv").open() as f:
        for row in csv.DictReader(f):
            if row["time"] == when:
                return float(row["g_co2_per_kwh"])
    raise AssertionError(f"{when} not in {region} trace")


@pytest.fixture(scope="module")
def static() -> StaticTableProvider:
    return StaticTableProvider()


@pytest.fixture(scope="module")
def traces() -> TimeSeriesProvider:
    return TimeSeriesProvider.from_dir(DATA_DIR, label=DEFAULT_LABEL)


@pytest.fixture(scope="module")
def replaying() -> TimeSeriesProvider:
    return TimeSeriesProvider.from_dir(DATA_DIR, label=DEFAULT_LABEL, replay=True)


# -- contract and accounting ---------------------------------------------------------


def test_carbon_g_is_kwh_times_intensity() -> None:
    figure = Intensity(400.0, "static:test-2024", "average", "XX")
    assert carbon_g(3.6e6, figure) == pytest.approx(400.0)  # 1 kWh
    assert carbon_g(1800.0, figure) == pytest.approx(0.2)  # 0.5 Wh
    assert carbon_g(0.0, figure) == 0.0
    with pytest.raises(ValueError, match="energy_j"):
        carbon_g(-1.0, figure)
    with pytest.raises(ValueError, match="energy_j"):
        carbon_g(float("nan"), figure)


def test_intensity_validates_and_normalises_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    figure = Intensity(1.0, "s", "marginal", "r", datetime(2026, 1, 1, 2, tzinfo=plus2), utc(2026, 1, 1, 1))
    assert figure.valid_from == utc(2026, 1, 1, 0) and figure.valid_from.tzinfo is UTC
    with pytest.raises(ValueError, match="timezone-aware"):
        Intensity(1.0, "s", "average", "r", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match=">= 0"):
        Intensity(-1.0, "s", "average", "r")
    with pytest.raises(ValueError, match="kind"):
        Intensity(1.0, "s", "hourly", "r")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        figure.g_co2_per_kwh = 2.0  # type: ignore[misc]


def test_error_classes_and_exit_codes() -> None:
    from orchestrator.carbon import CarbonProviderError

    assert issubclass(CarbonDataError, GreensweepError) and CarbonDataError.exit_code == 2
    assert issubclass(CarbonProviderError, GreensweepError) and CarbonProviderError.exit_code == 5
    assert issubclass(UnknownRegionError, CarbonDataError)


def test_step_windows_cut_the_last_slice() -> None:
    windows = step_windows(utc(2026, 1, 1), utc(2026, 1, 1, 2, 30), 3600)
    assert windows == [
        (utc(2026, 1, 1, 0), utc(2026, 1, 1, 1)),
        (utc(2026, 1, 1, 1), utc(2026, 1, 1, 2)),
        (utc(2026, 1, 1, 2), utc(2026, 1, 1, 2, 30)),
    ]
    with pytest.raises(ValueError, match="step_s"):
        step_windows(utc(2026, 1, 1), utc(2026, 1, 2), 0)
    with pytest.raises(ValueError, match="ends before"):
        step_windows(utc(2026, 1, 2), utc(2026, 1, 1), 60)


def test_window_mean_weights_by_time_and_reports_gaps() -> None:
    points = [(utc(2026, 1, 1, 0), 100.0), (utc(2026, 1, 1, 1), 400.0), (utc(2026, 1, 1, 3), 50.0)]  # 02:00 missing
    mean = window_mean(points, utc(2026, 1, 1, 0, 45), utc(2026, 1, 1, 1, 15), period_s=3600)
    assert mean == pytest.approx((15 * 100 + 15 * 400) / 30)
    assert window_mean(points, utc(2026, 1, 1, 0, 30), utc(2026, 1, 1, 0, 30), period_s=3600) == 100.0
    assert window_mean(points, utc(2026, 1, 1, 1, 30), utc(2026, 1, 1, 2, 30), period_s=3600) is None  # the gap
    assert window_mean(points, utc(2026, 1, 1, 3), utc(2026, 1, 1, 4, 30), period_s=3600) is None  # past the end
    late = window_mean(points, utc(2026, 1, 1, 3), utc(2026, 1, 1, 4, 30), period_s=3600, edge_tolerance_s=3600)
    assert late == 50.0
    assert window_mean([], utc(2026, 1, 1), utc(2026, 1, 1, 1), period_s=3600) is None


# -- static table ----------------------------------------------------------------------


def test_static_known_region(static: StaticTableProvider) -> None:
    start, end = utc(2026, 5, 1, 10), utc(2026, 5, 1, 11)
    figure = static.intensity("europe-north1", start, end)
    assert figure == Intensity(39.32, "static:google-cloud-2024", "average", "europe-north1", start, end)
    assert static.intensity("world", start, end).source == "static:iea-2019"
    assert static.intensity("FR", start, end).source == "static:owid-ember-2023"
    assert static.intensity("us-east-1", start, end).source == "static:ccf-epa-egrid-2020"
    assert static.intensity("eu-north-1", start, end).source == "static:ccf-eea (year unstated)"
    assert static.series("europe-west9", start, start + timedelta(hours=3), 3600) == [16.30] * 3


def test_static_unknown_region_names_region_provider_known_and_fix(static: StaticTableProvider) -> None:
    with pytest.raises(UnknownRegionError) as e:
        static.intensity("europe-nort1", utc(2026, 1, 1), utc(2026, 1, 1, 1))
    msg = str(e.value)
    assert "'europe-nort1'" in msg and "provider static" in msg
    assert "did you mean europe-north1" in msg
    assert "known: FR, IN, NO, PL, africa-south1" in msg and "(55 in all)" in msg
    assert "carbon.fallback" in msg and "regions.csv" in msg
    assert "\n" not in msg
    assert e.value.exit_code == 2


def test_every_shipped_row_has_source_and_year() -> None:
    rows = load_table(DEFAULT_TABLE)
    assert len(rows) == 55
    for row in rows.values():
        assert row.kind == "average"
        assert row.source and row.method
        assert isinstance(row.year, int) or "no data year" in row.method, row.region
    assert {r.source for r in rows.values()} == {
        "google-cloud", "ccf-epa-egrid", "ccf-eea", "ccf-carbonfootprint", "owid-ember", "iea",
    }
    google = [r for r in rows.values() if r.source == "google-cloud"]
    assert len(google) == 41 and all(r.year == 2024 for r in google)
    expected = {
        "africa-south1": 656.85, "europe-north2": 2.73, "us-east1": 575.77, "us-west4": 357.30,
        "us-east-1": 379.069, "eastus": 379.069, "us-west-2": 322.167, "eu-north-1": 8.8, "eu-west-1": 278.6,
        "northeurope": 278.6, "eu-central-1": 311.0, "ap-south-1": 708.2, "swedencentral": 5.67,
        "FR": 56.0, "PL": 661.9, "NO": 30.1, "IN": 713.4, "world": 475.0,
    }
    assert {region: rows[region].g_co2_per_kwh for region in expected} == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("region,value\nx,1\n", "header is region,value"),
        ("region,g_co2_per_kwh,kind,source,year,method\nx,1,average,src,2020,m\nx,2,average,src,2020,m\n", ":3: region 'x' appears twice"),
        ("region,g_co2_per_kwh,kind,source,year,method\nx,1,average,src,20x0,m\n", ":2: year must be a year or 'unstated'"),
        ("region,g_co2_per_kwh,kind,source,year,method\nx,-1,average,src,2020,m\n", "must be >= 0"),
        ("region,g_co2_per_kwh,kind,source,year,method\nx,1,forecast,src,2020,m\n", "kind must be average or marginal"),
        ("region,g_co2_per_kwh,kind,source,year,method\nx,1,average,Some Source,2020,m\n", "lower-case slug"),
        ("region,g_co2_per_kwh,kind,source,year,method\nx,1,average,src,2020,\n", "method is empty"),
        ("region,g_co2_per_kwh,kind,source,year,method\nx,1,average,src\n", "expected 6 fields"),
    ],
)
def test_bad_tables_are_rejected_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    table = tmp_path / "t.csv"
    table.write_text(text)
    with pytest.raises(CarbonDataError, match=message) as e:
        StaticTableProvider(table)
    assert str(table) in str(e.value)


# -- wrappers --------------------------------------------------------------------------


def test_fallback_is_labelled_and_only_for_unknown_regions(static: StaticTableProvider) -> None:
    provider = FallbackProvider(static, "world")
    start, end = utc(2026, 1, 1), utc(2026, 1, 1, 1)
    figure = provider.intensity("mars-north1", start, end)
    assert figure.fallback is True
    assert figure.region == "world" and figure.g_co2_per_kwh == 475.0
    assert figure.source == "static:iea-2019 (fallback for mars-north1)"
    real = provider.intensity("europe-west1", start, end)
    assert real.fallback is False and real.source == "static:google-cloud-2024"
    assert provider.series("mars-north1", start, start + timedelta(hours=2), 3600) == [475.0, 475.0]
    assert provider.region_status("mars-north1") == "fallback"
    assert provider.region_status("europe-west1") == "known"
    with pytest.raises(UnknownRegionError, match="carbon.fallback must name a region"):
        FallbackProvider(static, "atlantis")


def test_region_map_answers_for_the_mapped_region(static: StaticTableProvider) -> None:
    provider = RegionMapProvider(static, {"local": "FR"})
    figure = provider.intensity("local", utc(2026, 1, 1), utc(2026, 1, 1, 1))
    assert figure.region == "FR" and figure.g_co2_per_kwh == 56.0
    assert "local" in (provider.regions() or set())
    assert provider.region_status("local") == "known"


# -- hourly traces ---------------------------------------------------------------------


def test_trace_regions_and_span(traces: TimeSeriesProvider) -> None:
    assert traces.regions() == {"DE", "GB", "FR"}
    de, fr = traces.trace("DE"), traces.trace("FR")
    assert (de.start, de.end, de.step_s) == (utc(2019, 12, 20), utc(2021, 1, 10), 3600.0)
    assert fr.end == utc(2021, 1, 9, 23)  # FR's file is one hour shorter
    assert de.replay_year == 2020


def test_hour_aligned_window_returns_the_published_value(traces: TimeSeriesProvider) -> None:
    figure = traces.intensity("DE", utc(2020, 3, 1, 5), utc(2020, 3, 1, 6))
    assert figure.g_co2_per_kwh == trace_value("DE", "2020-03-01T05:00:00") == 143.35
    assert figure.source == "timeseries:entso-e/wiesner2021:DE-2020-hourly"
    assert figure.kind == "average" and figure.region == "DE" and not figure.fallback
    assert (figure.valid_from, figure.valid_to) == (utc(2020, 3, 1, 5), utc(2020, 3, 1, 6))
    # an instant is the value of the hour that contains it
    assert traces.intensity("DE", utc(2020, 3, 1, 5, 59), utc(2020, 3, 1, 5, 59)).g_co2_per_kwh == 143.35


def test_time_weighted_average_across_an_hour_boundary(traces: TimeSeriesProvider) -> None:
    v5, v6 = trace_value("GB", "2020-07-15T05:00:00"), trace_value("GB", "2020-07-15T06:00:00")
    half = traces.intensity("GB", utc(2020, 7, 15, 5, 30), utc(2020, 7, 15, 6, 30)).g_co2_per_kwh
    assert half == pytest.approx((v5 + v6) / 2)
    skewed = traces.intensity("GB", utc(2020, 7, 15, 5, 45), utc(2020, 7, 15, 6, 30)).g_co2_per_kwh
    assert skewed == pytest.approx((15 * v5 + 30 * v6) / 45)
    assert skewed != pytest.approx(half)


def test_windows_in_other_zones_are_converted_to_utc(traces: TimeSeriesProvider) -> None:
    cest = timezone(timedelta(hours=2))
    local = traces.intensity("DE", datetime(2020, 3, 1, 7, tzinfo=cest), datetime(2020, 3, 1, 8, tzinfo=cest))
    assert local.g_co2_per_kwh == 143.35 and local.valid_from == utc(2020, 3, 1, 5)
    with pytest.raises(ValueError, match="timezone-aware"):
        traces.intensity("DE", datetime(2020, 3, 1, 5), datetime(2020, 3, 1, 6))


def test_series_gives_one_mean_per_step(traces: TimeSeriesProvider) -> None:
    series = traces.series("FR", utc(2020, 6, 1, 0), utc(2020, 6, 1, 3), 3600)
    assert series == [trace_value("FR", f"2020-06-01T0{h}:00:00") for h in range(3)]
    two_hourly = traces.series("FR", utc(2020, 6, 1, 0), utc(2020, 6, 1, 4), 7200)
    assert two_hourly == pytest.approx([(series[0] + series[1]) / 2, traces.intensity("FR", utc(2020, 6, 1, 2), utc(2020, 6, 1, 4)).g_co2_per_kwh])


def test_outside_the_span_without_replay_is_an_error(traces: TimeSeriesProvider) -> None:
    with pytest.raises(CarbonDataError) as e:
        traces.intensity("DE", utc(2026, 3, 1, 5), utc(2026, 3, 1, 6))
    msg = str(e.value)
    assert "DE-2020-hourly" in msg and "2019-12-20T00:00Z..2021-01-10T00:00Z" in msg
    assert "carbon.replay: true" in msg and e.value.exit_code == 2
    with pytest.raises(CarbonDataError, match="outside"):  # straddling the end is outside too
        traces.intensity("DE", utc(2021, 1, 9, 23), utc(2021, 1, 10, 1))


def test_replay_maps_2026_onto_the_same_calendar_hour_of_2020(replaying: TimeSeriesProvider) -> None:
    figure = replaying.intensity("DE", utc(2026, 3, 1, 5), utc(2026, 3, 1, 6))
    # 2026 is not a leap year: 1 March maps to 1 March 2020, not to 29 February (same day-of-year)
    assert figure.g_co2_per_kwh == trace_value("DE", "2020-03-01T05:00:00")
    assert figure.g_co2_per_kwh != trace_value("DE", "2020-02-29T05:00:00")
    assert figure.source == "timeseries:entso-e/wiesner2021:DE-2020-hourly (replayed)"
    assert (figure.valid_from, figure.valid_to) == (utc(2026, 3, 1, 5), utc(2026, 3, 1, 6))
    feb28 = replaying.intensity("DE", utc(2026, 2, 28, 23), utc(2026, 3, 1, 0))
    assert feb28.g_co2_per_kwh == trace_value("DE", "2020-02-28T23:00:00")


def test_replay_of_a_leap_day_and_across_new_year(replaying: TimeSeriesProvider) -> None:
    leap = replaying.intensity("GB", utc(2028, 2, 29, 12), utc(2028, 2, 29, 13))
    assert leap.g_co2_per_kwh == trace_value("GB", "2020-02-29T12:00:00")
    new_year = replaying.intensity("FR", utc(2026, 12, 31, 23), utc(2027, 1, 1, 1))
    expected = (trace_value("FR", "2020-12-31T23:00:00") + trace_value("FR", "2021-01-01T00:00:00")) / 2
    assert new_year.g_co2_per_kwh == pytest.approx(expected)
    # a window that crosses 28 Feb -> 1 Mar keeps its length (2026 has no 29 Feb; the shift is constant)
    crossing = replaying.series("DE", utc(2026, 2, 28, 22), utc(2026, 3, 1, 1), 3600)
    assert crossing == [trace_value("DE", t) for t in ("2020-02-28T22:00:00", "2020-02-28T23:00:00", "2020-02-29T00:00:00")]


def test_replay_leaves_windows_inside_the_trace_alone(replaying: TimeSeriesProvider) -> None:
    real = replaying.intensity("DE", utc(2019, 12, 25, 12), utc(2019, 12, 25, 13))
    assert real.g_co2_per_kwh == trace_value("DE", "2019-12-25T12:00:00")
    assert "replayed" not in real.source
    with pytest.raises(CarbonDataError, match="too long to replay"):
        replaying.intensity("DE", utc(2026, 1, 1), utc(2027, 3, 1))


def test_trace_means_match_the_published_figures(traces: TimeSeriesProvider) -> None:
    """shared/data/README.md: DE 102-593 (mean 315), GB 65-384 (mean 215), FR 20-116 (mean 57)."""
    published = {"DE": (102, 593, 315), "GB": (65, 384, 215), "FR": (20, 116, 57)}
    for region, (low, high, mean) in published.items():
        trace = traces.trace(region)
        assert (round(min(trace.values)), round(max(trace.values))) == (low, high)
        whole = traces.intensity(region, trace.start, trace.end).g_co2_per_kwh
        assert whole == pytest.approx(mean, abs=0.6)  # the README's means are over the whole files
        year_2020 = traces.intensity(region, utc(2020, 1, 1), utc(2021, 1, 1)).g_co2_per_kwh
        assert year_2020 == pytest.approx(mean, rel=0.015)


def test_bad_traces_name_file_and_line(tmp_path: Path) -> None:
    gap = tmp_path / "XX-2020-hourly.csv"
    gap.write_text("time,g_co2_per_kwh\n2020-01-01T00:00:00,1\n2020-01-01T01:00:00,2\n2020-01-01T03:00:00,3\n")
    with pytest.raises(CarbonDataError, match=r"XX-2020-hourly.csv:4: .*breaks the regular 1:00:00 grid"):
        load_trace(gap)
    bad_value = tmp_path / "YY-2020-hourly.csv"
    bad_value.write_text("time,g_co2_per_kwh\n2020-01-01T00:00:00,abc\n")
    with pytest.raises(CarbonDataError, match=r"YY-2020-hourly.csv:2: g_co2_per_kwh 'abc'"):
        load_trace(bad_value)
    with pytest.raises(CarbonDataError, match="no \\*-hourly.csv files"):
        TimeSeriesProvider.from_dir(tmp_path / "empty", label="x")


def test_trace_with_explicit_offsets_is_read_as_utc(tmp_path: Path) -> None:
    path = tmp_path / "ZZ-x-hourly.csv"
    path.write_text("time,g_co2_per_kwh\n2020-01-01T01:00:00+01:00,10\n2020-01-01T01:00:00Z,20\n")
    provider = TimeSeriesProvider({"ZZ": path}, label="test")
    assert provider.intensity("ZZ", utc(2020, 1, 1, 0), utc(2020, 1, 1, 2)).g_co2_per_kwh == 15.0
    assert provider.intensity("ZZ", utc(2020, 1, 1, 0), utc(2020, 1, 1, 1)).source == "timeseries:test:ZZ-x-hourly"


def test_unknown_trace_region(traces: TimeSeriesProvider) -> None:
    with pytest.raises(UnknownRegionError, match="'PL' for provider timeseries .*known: DE, FR, GB"):
        traces.intensity("PL", utc(2020, 1, 1), utc(2020, 1, 1, 1))


# -- config, factory, spec-time check --------------------------------------------------


def test_default_config_is_the_static_table() -> None:
    config = parse_carbon_config(None)
    assert config == CarbonConfig() and config.provider == "static"
    provider = make_provider(config)
    assert isinstance(provider, StaticTableProvider)
    with pytest.raises(Exception):
        config.provider = "watttime"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"provider": "carbonara"}, "carbon.provider: unknown provider; use one of static, timeseries, electricitymaps, watttime (got 'carbonara')"),
        ({"provder": "static"}, "carbon.provder: unknown key; allowed: provider, table"),
        ({"provider": "static", "replay": True}, "'replay' applies only to provider timeseries, not static -- remove it"),
        ({"provider": "timeseries", "replay": "yes"}, "carbon.replay: Input should be a valid boolean"),
        ({"provider": "timeseries", "table": "x.csv"}, "'table' applies only to provider static"),
        ({"provider": "static", "base_url": "http://x"}, "'base_url' applies only to provider electricitymaps or watttime"),
        ({"provider": "static", "timeout_s": 3}, "'timeout_s' applies only"),
        ({"provider": "watttime", "timeout_s": 0}, "carbon.timeout_s: Input should be greater than 0"),
        ({"regions": {"local": False}}, "quote the region name"),
        ({"regions": {"local": ""}}, "carbon.regions: region names must be non-empty"),
        ({"fallback": ""}, "carbon.fallback: String should have at least 1 character"),
        (["static"], "carbon: must be a mapping"),
    ],
)
def test_config_errors_name_the_field(raw: object, message: str) -> None:
    with pytest.raises(CarbonDataError) as e:
        parse_carbon_config(raw)
    assert message in str(e.value)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_config_from_yaml_as_written_in_a_spec() -> None:
    section = yaml.safe_load(
        """
        carbon:
          provider: timeseries
          replay: true
          fallback: DE
          regions: {local: FR, europe-west2: GB}
        """
    )["carbon"]
    config = parse_carbon_config(section)
    assert (config.provider, config.replay, config.fallback) == ("timeseries", True, "DE")
    assert config.regions == {"local": "FR", "europe-west2": "GB"}
    unquoted = yaml.safe_load("carbon: {regions: {oslo: NO}}")["carbon"]
    with pytest.raises(CarbonDataError, match=r"carbon.regions.oslo: .*\(got False\); YAML reads NO"):
        parse_carbon_config(unquoted)
    assert parse_carbon_config(yaml.safe_load('carbon: {regions: {oslo: "NO"}}')["carbon"]).regions == {"oslo": "NO"}


def test_config_paths_resolve_against_the_spec_directory(tmp_path: Path) -> None:
    config = parse_carbon_config({"table": "clusters/carbon/regions.csv"}, base_dir=REPO)
    assert config.table == DEFAULT_TABLE.resolve()
    with pytest.raises(CarbonDataError, match=f"carbon.table: file not found: {tmp_path / 'nope.csv'}"):
        parse_carbon_config({"table": "nope.csv"}, base_dir=tmp_path)
    with pytest.raises(CarbonDataError, match="carbon.data_dir: directory not found"):
        parse_carbon_config({"provider": "timeseries", "data_dir": "nope"}, base_dir=tmp_path)


def test_missing_credentials_are_named_at_provider_creation() -> None:
    with pytest.raises(CarbonDataError, match="environment variable ELECTRICITYMAPS_TOKEN") as e:
        make_provider(parse_carbon_config({"provider": "electricitymaps"}), env={})
    assert e.value.exit_code == 2
    with pytest.raises(CarbonDataError, match="needs WATTTIME_USERNAME and WATTTIME_PASSWORD"):
        make_provider(parse_carbon_config({"provider": "watttime"}), env={})
    with pytest.raises(CarbonDataError, match="needs WATTTIME_PASSWORD in the environment"):
        make_provider(parse_carbon_config({"provider": "watttime"}), env={"WATTTIME_USERNAME": "u"})


def test_timeseries_config_with_aliases_replay_and_fallback() -> None:
    config = parse_carbon_config(
        {"provider": "timeseries", "replay": True, "fallback": "DE", "regions": {"local": "FR", "europe-west2": "GB"}}
    )
    provider = make_provider(config)
    start, end = utc(2026, 3, 1, 5), utc(2026, 3, 1, 6)
    local = provider.intensity("local", start, end)
    assert local.region == "FR" and local.source.endswith("FR-2020-hourly (replayed)") and not local.fallback
    other = provider.intensity("us-east1", start, end)
    assert other.fallback and other.region == "DE"
    assert other.source == "timeseries:entso-e/wiesner2021:DE-2020-hourly (replayed) (fallback for us-east1)"
    assert check_regions(provider, ["local", "europe-west2", "us-east1", "DE"]) == ["us-east1"]


def test_factory_rejects_aliases_and_fallbacks_the_provider_does_not_know() -> None:
    with pytest.raises(UnknownRegionError, match="unknown region 'FX' .*fix carbon.regions.local"):
        make_provider(parse_carbon_config({"provider": "timeseries", "regions": {"local": "FX"}}))
    with pytest.raises(UnknownRegionError, match="'atlantis' .*carbon.fallback must name a region"):
        make_provider(parse_carbon_config({"fallback": "atlantis"}))


def test_check_regions_stops_unknown_regions_before_work(static: StaticTableProvider) -> None:
    assert check_regions(static, ["europe-north1", "FR"]) == []
    with pytest.raises(UnknownRegionError, match="'mars-1' for provider static"):
        check_regions(static, ["europe-north1", "mars-1"])
    with pytest.raises(CarbonDataError, match="unknown regions 'mars-1', 'venus-2' for provider static .* set carbon.fallback"):
        check_regions(static, ["venus-2", "mars-1"])
    assert check_regions(FallbackProvider(static, "world"), ["mars-1", "FR"]) == ["mars-1"]


def test_http_providers_cannot_check_regions_offline() -> None:
    provider = make_provider(parse_carbon_config({"provider": "electricitymaps"}), env={"ELECTRICITYMAPS_TOKEN": "t"})
    assert provider.regions() is None
    assert provider.region_status("anything") == "unchecked"
    assert check_regions(provider, ["DE", "anything"]) == []
