"""``kgrad inspect``'s text (pipeline.inspect_output.format_output) for runs with a tolerance: pairs covered per
second beside pairs computed, and a run that fell back to exact said to be exact (not "|g^ - g| <= 0")."""

from __future__ import annotations

from pipeline.inspect_output import format_output


def _info(**changes) -> dict:
    info = {"location": "out.zarr", "complete": True, "tasks_done": 4, "tasks_total": 4, "arrays": {},
            "kernel_description": "rbf(variance=1, lengthscale=0.2)", "formulation": "radial", "dtype": "float32",
            "mode": "auto", "N": 100_000, "M": 100_000, "D": 3, "inputs": {}, "kgrad_version": "0",
            "run_fingerprint": "f" * 32, "plan": {"n_tasks": 4},
            "timings": {"total_seconds": 9.0, "execute_seconds": 5.0, "tasks_run": 4, "tasks_skipped": 0,
                        "pairs_per_second": 2e7},
            "pairs_total": 10**10, "pairs_computed": 10**10}
    info.update(changes)
    return info


def _line(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(name))


def test_exact_run_shows_one_rate():
    timings = _line(format_output(_info()), "timings")
    assert "2.00 G pairs/s," in timings and "computed" not in timings, timings


def test_pruned_run_shows_pairs_covered_per_second_and_computed_beside():
    """1e10 pairs covered in 5 s of tasks is 2 G pairs/s whatever was skipped; 1e8 computed is 0.02 G/s."""
    text = format_output(_info(tolerance=1e-9, pairs_computed=10**8,
                               error_bound={"gradient": 1e-6, "value": 2e-6}))
    assert "2.00 G pairs/s covered (0.02 G/s computed)" in _line(text, "timings"), text
    assert "0.01 G pairs/s" not in text
    tolerance = _line(text, "tolerance")
    assert "|g^ - g| <= 1e-06" in tolerance and "1.00% of the pairs computed" in tolerance, tolerance


def test_run_that_fell_back_to_exact_says_it_was_exact():
    reason = "pruning would skip only 3% of the pairs at this tolerance, so every pair is computed"
    text = format_output(_info(tolerance=1e-9, error_bound={"gradient": 0.0, "value": 0.0}, exact_reason=reason))
    tolerance = _line(text, "tolerance")
    assert "<= 0" not in tolerance, tolerance
    assert "the run was exact" in tolerance and reason in tolerance, tolerance
    assert "float32 rounding applies" in tolerance and "2e-5" in tolerance, tolerance
    float64 = _line(format_output(_info(tolerance=1e-9, dtype="float64", error_bound={"gradient": 0.0, "value": 0.0},
                                        exact_reason="kernel periodic does not decay")), "tolerance")
    assert "float64 rounding applies" in float64 and "1e-10" in float64, float64


def test_pruned_run_whose_far_field_declined_keeps_its_bounds():
    """A pruned run records why the far field declined; inspect still gives the run's bounds and share of pairs
    (it computed only some pairs) and says why beside them, never that the run was exact."""
    reason = "no far field: its grid would need at least 4.97e+10 nodes"
    text = format_output(_info(tolerance=1e-9, pairs_computed=10**8, error_bound={"gradient": 1e-6, "value": 2e-6},
                               exact_reason=reason))
    tolerance = _line(text, "tolerance")
    assert "exact" not in tolerance and "rounding applies" not in tolerance, tolerance
    assert "|g^ - g| <= 1e-06" in tolerance and "1.00% of the pairs computed" in tolerance, tolerance
    assert f"({reason})" in tolerance, tolerance
