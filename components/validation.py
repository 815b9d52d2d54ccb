"""great-expectations suites for the pair tables curate reads and writes.

A failed expectation stops the stage with a report that names the suite, each failed expectation, its column,
how many rows broke it and a sample of the offending values.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


class ValidationFailed(ValueError):
    """A great-expectations suite failed; the message is the readable report."""


@dataclass(frozen=True)
class TextLimits:
    min_query_chars: int
    min_positive_chars: int
    max_positive_chars: int


def _expectations(limits: TextLimits | None) -> list:
    import great_expectations.expectations as gxe

    checks = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *[gxe.ExpectColumnToExist(column=name) for name in ("id", "query", "positive", "source")],
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        *[gxe.ExpectColumnValuesToNotBeNull(column=name) for name in ("id", "query", "positive", "source")],
        *[gxe.ExpectColumnValueLengthsToBeBetween(column=name, min_value=1) for name in ("query", "positive")],
    ]
    if limits is not None:  # the curated table: split assigned, deduplicated, lengths within the limits
        checks += [
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["query", "positive"]),
            gxe.ExpectColumnValueLengthsToBeBetween(column="query", min_value=limits.min_query_chars),
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="positive", min_value=limits.min_positive_chars, max_value=limits.max_positive_chars
            ),
        ]
    return checks


def _report(suite_name: str, source: str, results: list) -> str:
    lines = [f"great-expectations suite {suite_name!r} failed on {source}:"]
    for result in results:
        config = result.expectation_config
        outcome = result.result or {}
        column = config.kwargs.get("column") or config.kwargs.get("column_list") or "(table)"
        detail = ""
        if "unexpected_count" in outcome:
            sample = [str(value)[:60] for value in (outcome.get("partial_unexpected_list") or [])[:3]]
            detail = f": {outcome['unexpected_count']} unexpected row(s), e.g. {sample}"
        elif "observed_value" in outcome:
            detail = f": observed {outcome['observed_value']!r}"
        lines.append(f"  - {config.type} on {column}{detail}")
    return "\n".join(lines)


def validate_pairs(frame: pd.DataFrame, *, suite_name: str, source: str, limits: TextLimits | None = None) -> int:
    """Validate `frame`; with `limits` it is checked as curated output. Returns the number of expectations."""
    # GX sets its own loggers to INFO on import and reports its internals there (registries, temporary docs
    # dirs): quiet during the import, then WARNING for its loggers.
    logging.disable(logging.INFO)
    try:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
    finally:
        logging.disable(logging.NOTSET)
    for name in [name for name in logging.root.manager.loggerDict if name.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.WARNING)

    with warnings.catch_warnings():
        # GX warns about its own analytics and deprecated internals; nothing a user of embedforge can act on.
        warnings.filterwarnings("ignore", module="great_expectations")
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        batch = (
            context.data_sources.add_pandas(name=f"{suite_name}_source")
            .add_dataframe_asset(name=suite_name)
            .add_batch_definition_whole_dataframe(name="all_rows")
            .get_batch(batch_parameters={"dataframe": frame})
        )
        suite = gx.ExpectationSuite(name=suite_name)
        for expectation in _expectations(limits):
            suite.add_expectation(expectation)
        outcome = batch.validate(suite, result_format="SUMMARY")
    failed = [result for result in outcome.results if not result.success]
    if failed:
        raise ValidationFailed(_report(suite_name, source, failed))
    log.info("great-expectations suite %r passed (%d expectations) on %s", suite_name, len(outcome.results), source)
    return len(outcome.results)
