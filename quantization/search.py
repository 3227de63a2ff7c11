"""The ``--max-drift`` search: keep the most sensitive units in float until the int8 artifact meets its budget.

Split the way NNCF's accuracy-control algorithm (``nncf.quantize_with_accuracy_control``) is:

- the ranker (``Ranker``): which units int8 hurts most, measured once when the first round misses its budget
  (``sensitivity.rank_units``: fidelity gained by switching off each unit's fake quantizers alone);
- the evaluator (``Evaluator``): one round, quantize with some units float, export and validate in the runtime;
  its result (``Round``) holds the artifact's folder, manifest, runner and validation summary;
- the loop (``search``): which units to keep float next (1, 2, 4, ... more of the ranking), when to stop (the
  budget met, a round worse than the best so far, rounds spent, nothing left to keep) and which round to keep
  (``round_order``: passed first, then the lowest drift, else the highest minimum fidelity).

``int8_search`` runs the three for ``convert``, announces each round and its result (``nafnet_edge.progress``),
and records every round,
the ranking and the kept round's latency against the first round's in the manifest's ``quantization.search``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nafnet_edge import progress
from nafnet_edge.errors import OptionError
from nafnet_edge.manifest import Manifest
from nafnet_edge.quantization.base import Quantizer

MakeQuantizer = Callable[[Collection[str]], Quantizer]  # the target's quantizer keeping these units float


@dataclass
class Round:
    """One quantize-export-validate round; its files live in ``directory`` until it is kept."""

    number: int  # 1-based, as the progress lines say
    kept_float: list[str]
    directory: Path
    manifest: Manifest
    runner: Any  # None when the artifact is not validated

    def record(self) -> dict[str, Any]:
        """The round's entry in the manifest's ``quantization.search.rounds`` (a validated round's)."""
        validation = self.manifest.validation
        if validation is None:
            raise ValueError(f"round {self.number} was not validated: no record to compare it by")
        return {
            "kept_float": list(self.kept_float),
            "passed": validation.passed,
            "drift_db_mean": validation.summary.get("drift_db_mean"),
            "fidelity_db_min": validation.summary["fidelity_db_min"],
            "seconds": {**self.manifest.seconds},
        }


def round_order(entry: dict[str, Any]) -> tuple[bool, float]:
    """Sort key of a round's entry, best first: passed before failed, then the lowest drift where drift is
    measured (ground-truth pairs), otherwise the highest minimum fidelity."""
    drift = entry["drift_db_mean"]
    return not entry["passed"], drift if drift is not None else -entry["fidelity_db_min"]


def next_kept(kept: Sequence[str], ranking: Sequence[tuple[str, float]]) -> list[str]:
    """The next round's kept units: ``kept`` plus as many of the most sensitive others again (at least one)."""
    candidates = [unit for unit, _ in ranking if unit not in kept]
    return [*kept, *candidates[: max(1, len(kept))]]


def round_name(label: str, number: int, total: int) -> str:
    """``executorch-int8: search round 2/5`` (``executorch-int8`` alone when there is one round only)."""
    return f"{label}: search round {number}/{total}" if total > 1 else label


def float_units(kept: Sequence[str]) -> str:
    """``2 units float (encoders.0.0, ups.0)``, or ``all units int8``."""
    if not kept:
        return "all units int8"
    return f"{len(kept)} unit{'s' if len(kept) > 1 else ''} float ({', '.join(kept)})"


def round_line(label: str, number: int, total: int, entry: dict[str, Any], verdict: str) -> str:
    """A validated round's result: its float units, what it measured and the verdict."""
    drift = entry["drift_db_mean"]
    measured = (f"drift {drift:+.3f} dB, " if drift is not None else "") + f"fidelity {entry['fidelity_db_min']:.1f} dB"
    return f"{round_name(label, number, total)}: {float_units(entry['kept_float'])}: {measured} - {verdict}"


def quantize(
    quantizer: Quantizer, graph: torch.nn.Module, input_size: tuple[int, int], int8: Any, label: str = "int8"
) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """Calibrate (and with QAT fine-tune) ``graph`` for ``quantizer`` with ``int8``'s images and loop settings
    (``convert.Int8Settings``); the prepared module, an export example of ``input_size`` and the loop's log.
    ``label`` (``executorch-int8``) starts the progress lines."""
    from nafnet_edge.quantization.train import quantize_graph

    h, w = input_size
    if h != w:
        raise OptionError("int8 training uses square crops: give a square --input-size")
    prepared, log = quantize_graph(
        quantizer,
        graph,
        int8.images,
        h,
        int8.config,
        checkpoint=int8.checkpoint,
        resume=int8.resume,
        progress=int8.progress,
        label=label,
    )
    return prepared, torch.rand(1, int(graph.in_channels), h, w), log  # type: ignore[arg-type]


@dataclass
class Evaluator:
    """Quantizes, exports and validates one round into its own folder under ``scratch``."""

    stage: Any  # convert's stage: target, label, graph, options, export_and_validate(export, directory)
    make_quantizer: MakeQuantizer
    int8: Any  # convert.Int8Settings
    scratch: Path

    def __call__(self, number: int, kept: Sequence[str]) -> Round:
        stage = self.stage
        quantizer = self.make_quantizer(kept)
        units = f"keeping {float_units(kept)}" if kept else float_units(kept)
        progress.phase(f"{round_name(stage.label, number, self.int8.search_rounds + 1)}: {units}")
        settings = self.int8 if number == 1 else replace(self.int8, resume=False)  # the checkpoint is round 1's
        started = time.perf_counter()
        prepared, example, log = quantize(quantizer, stage.graph, stage.options.input_size, settings, stage.label)
        seconds = round(time.perf_counter() - started, 2)
        directory = self.scratch / str(number)
        directory.mkdir(parents=True)
        manifest, runner = stage.export_and_validate(
            lambda d: quantizer.export(prepared, d, example, pixel_format=stage.options.pixel_format), directory
        )
        manifest.seconds["quantize"] = seconds
        manifest.quantization = {"data": self.int8.data, **log, "kept_float": list(kept)}
        return Round(number, list(kept), directory, manifest, runner)


@dataclass
class Ranker:
    """The graph's units by int8 sensitivity, most sensitive first, measured once (on the first call) on
    held-out crops of the training images."""

    stage: Any
    make_quantizer: MakeQuantizer
    int8: Any
    ranking: list[tuple[str, float]] | None = None

    def __call__(self, kept: Sequence[str]) -> list[tuple[str, float]]:
        """The ranking of the units not in ``kept`` (the float units of the first ranked round); raises
        ``NotImplementedError`` for a quantizer that cannot switch its quantizers per unit."""
        if self.ranking is None:
            from nafnet_edge.quantization import sensitivity
            from nafnet_edge.quantization.train import calibration_crops, held_out_crops

            progress.phase(f"{self.stage.label}: ranking units by int8 sensitivity")
            quantizer = self.make_quantizer(kept)
            if not quantizer.switches_units:
                raise NotImplementedError(f"{type(quantizer).__name__} cannot switch quantizers per unit")
            h = self.stage.options.input_size[0]
            crops = held_out_crops(self.int8.images, h, self.int8.config, sensitivity.SENSITIVITY_CROPS)
            calibration = calibration_crops(self.int8.images, h, self.int8.config)
            with progress.backend_output():
                self.ranking = sensitivity.rank_units(quantizer, self.stage.graph, crops, calibration, exclude=kept)
        return self.ranking


@dataclass
class SearchResult:
    best: Round
    first: Round | None  # the first validated round (all units int8 unless --keep-float), for the latency cost
    rounds: list[dict[str, Any]] = field(default_factory=list)  # every validated round's record
    stopped: str = ""
    ranking: list[tuple[str, float]] | None = None


def search(
    evaluate: Callable[[int, Sequence[str]], Round],
    rank: Callable[[Sequence[str]], list[tuple[str, float]]],
    *,
    keep_float: Sequence[str],
    search_rounds: int,
    label: str,
) -> SearchResult:
    """Evaluate with ``keep_float`` float; while the artifact misses its budget, keep the next most sensitive
    units in float (1, 2, 4, ... more of them, ``rank``-ed once) and evaluate again, at most ``search_rounds``
    times, stopping early at the first round worse than the best so far (``round_order``). Each validated round's
    result is a progress line starting with ``label``; the folders of rounds that are neither the first nor the
    best are removed."""
    kept = list(keep_float)
    total = search_rounds + 1
    rounds: list[dict[str, Any]] = []
    ranking: list[tuple[str, float]] | None = None
    first: Round | None = None
    best: Round | None = None
    stopped = ""
    while True:
        number = len(rounds) + 1
        this = evaluate(number, kept)
        if this.runner is None:  # not validated: nothing to compare rounds by
            return SearchResult(this, None)
        rounds.append(this.record())
        first = first or this
        previous = best
        if previous is None or round_order(rounds[-1]) < round_order(rounds[previous.number - 1]):
            best = this
        if rounds[-1]["passed"]:
            verdict, stopped = "meets the budget", "met the budget"
        elif previous is None:
            verdict = "misses the budget"
        elif best is this:
            verdict = "misses the budget, best so far"
        elif round_order(rounds[-1]) > round_order(rounds[previous.number - 1]):
            verdict = f"worse than round {previous.number}: stopping, keeping round {previous.number}"
            stopped = f"round {number} was worse than round {previous.number}"
        else:
            verdict = f"no better than round {previous.number}"
        progress.phase(round_line(label, number, total, rounds[-1], verdict))
        if previous is not None and previous is not best and previous is not first:
            shutil.rmtree(previous.directory)  # superseded: only the first (for latency) and the best stay
        if this is not best and this is not first:
            shutil.rmtree(this.directory)
        if stopped:
            break
        if number == total:
            stopped = f"--search-rounds {search_rounds} spent" if search_rounds else "search off"
            break
        try:
            ranking = rank(kept)
        except NotImplementedError as e:
            stopped = str(e)
            break
        following = next_kept(kept, ranking)
        if following == kept:
            stopped = "every unit is float already"
            break
        kept = following
    assert best is not None  # the first validated round sets it
    return SearchResult(best, first, rounds, stopped, ranking)


def int8_search(stage: Any, make_quantizer: MakeQuantizer, int8: Any, tmp: Path) -> Manifest:
    """Run the search for ``convert``'s ``stage`` with ``int8`` (``convert.Int8Settings``: ``keep_float`` to
    start from, ``search_rounds``); the kept round's files are moved into ``tmp`` and its manifest returned,
    recording every round, which one was kept (``kept_round``, an index into ``rounds``), why the search
    stopped, the ranking and the latency of the kept round against the first, measured side by side."""
    from nafnet_edge.quantization.sensitivity import check_units

    check_units(stage.graph, int8.keep_float)
    scratch = tmp / ".int8-rounds"
    try:
        result = search(
            Evaluator(stage, make_quantizer, int8, scratch),
            Ranker(stage, make_quantizer, int8),
            keep_float=int8.keep_float,
            search_rounds=int8.search_rounds,
            label=stage.label,
        )
        manifest = result.best.manifest
        if result.rounds:
            search_record = _search_record(stage, result, int8.search_rounds)
            manifest.quantization = {**(manifest.quantization or {}), "search": search_record}
            if manifest.validation is not None and not manifest.validation.passed:
                from nafnet_edge.usage import budget_advice

                failures = "; ".join(manifest.validation.failures)
                progress.note(
                    f"{stage.label} missed its budget in {len(result.rounds)} round(s) ({result.stopped}); "
                    f"kept round {result.best.number}: {failures}. Try next: {budget_advice(manifest)}"
                )
        for path in list(result.best.directory.iterdir()):
            shutil.move(str(path), str(tmp / path.name))
        return manifest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _search_record(stage: Any, result: SearchResult, search_rounds: int) -> dict[str, Any]:
    """The manifest's ``quantization.search``; measures the kept round's latency against the first round's."""
    from nafnet_edge.quantization.sensitivity import interleaved_medians

    record: dict[str, Any] = {
        "budget_rounds": search_rounds,
        "rounds": result.rounds,
        "kept_round": result.best.number - 1,
        "stopped": result.stopped,
    }
    if result.ranking is not None:
        record["sensitivity_db"] = {unit: round(gain, 3) for unit, gain in result.ranking}
    first, best = result.first, result.best
    if first is not None and first is not best:
        progress.phase(f"{stage.label}: latency of the kept round against the first")
        c = stage.loaded.config.in_channels
        x = np.random.default_rng(0).random((1, c, *stage.options.input_size), dtype=np.float32)
        with progress.backend_output():
            medians = interleaved_medians({"first": first.runner.run, "kept": best.runner.run}, x)
        record["latency_ms"] = {
            "first_round": medians["first"],
            "kept_round": medians["kept"],
            "ratio": round(medians["kept"] / medians["first"], 3) if medians["first"] > 0 else None,
            "input": list(x.shape),
            "note": "medians of 7 interleaved runs on this machine",
        }
    return record
