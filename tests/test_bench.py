"""gqn-bench smoke tests (never timed): the documented modes run and write their JSON."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from gqn.bench import main


def test_train_benchmark_with_activation_checkpointing_writes_json(tmp_path):
    run_cli("gqn-bench", "train", "--configs", "small", "--steps", "1", "--batch", "1", "--context", "1",
            "--paths", "fast", "--checkpoint-steps", "--out", str(tmp_path), cwd=tmp_path)
    result = json.loads((tmp_path / "train.json").read_text())
    (row,) = result["results"]
    assert row["config"] == "small" and row["path"] == "fast" and row["checkpoint_steps"] is True
    assert row["gflop_per_step"] > 0 and row["seconds_per_step"] > 0 and row["peak_rss_gb"] > 0


def test_checkpoint_steps_on_the_reference_path_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--checkpoint-steps"])
    assert exit_info.value.code == 2
    assert "--checkpoint-steps needs --paths fast" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory"])  # the undocumented mode is gone: the flag above replaces it
