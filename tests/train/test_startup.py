"""Worker start-up phases: the clock's marks, the row rank 0 sends, and the console line."""

from __future__ import annotations

import time

import pytest

from catdpo_ray.train.startup import StartupClock, describe


def test_marks_close_phases_in_order_and_the_row_carries_them() -> None:
    clock = StartupClock(own_process=True)
    assert clock.seconds["launch"] is not None and clock.seconds["launch"] >= 0.0  # this process's age
    time.sleep(0.02)
    clock.mark("import")
    clock.mark("tokenizer")
    row = clock.row(4)
    assert row["kind"] == "startup" and row["step"] == 4 and row["entry_time"] == clock.entry_time
    assert list(row["seconds"]) == ["launch", "import", "tokenizer"]  # never-marked phases are absent
    assert row["seconds"]["import"] >= 0.02 and row["seconds"]["tokenizer"] < row["seconds"]["import"]
    with pytest.raises(ValueError, match="unknown start-up phase 'imports'"):
        clock.mark("imports")


def test_local_mode_has_no_launch_phase() -> None:
    assert StartupClock(own_process=False).row(0)["seconds"] == {"launch": None}


def test_console_line_counts_launch_inside_fit_to_entry() -> None:
    row = {"kind": "startup", "step": 0, "entry_time": 110.0,
           "seconds": {"launch": 6.0, "import": 0.5, "model_and_engine": 2.0, "first_step": 0.5}}
    line = describe(row, fit_start_time=100.0)
    assert line == ("worker start (fresh start) to the end of its first step: 13.0s = fit to entry 10.0s, launch 6.0s, "
                    "import 0.5s, model and engine 2.0s, first step 0.5s")
    # without the driver's fit() time, launch is the only measure of what came before the function
    assert describe({**row, "step": 8}, None).startswith("worker start (from step 8) to the end of its first step: 9.0s")
    local = {"kind": "startup", "step": 0, "entry_time": 100.5, "seconds": {"launch": None, "import": 1.0}}
    assert describe(local, 100.0).endswith("1.5s = fit to entry 0.5s, import 1.0s")

