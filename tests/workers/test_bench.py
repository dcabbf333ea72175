"""`strata bench` on a small CL_Benchmark-format folder written by the test."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from api.cli import main
from continual import fold as continual_fold
from continual import stream

WORDS = {
    "Sports": ["match", "goal", "team", "coach"],
    "Food": ["bread", "soup", "cheese", "pasta"],
    "Weather": ["rain", "storm", "sunny", "cloud"],
}
FILLER = ["the", "a", "today", "really", "some", "again"]


def _write_task(root: Path, name: str, labels: list[str], rng: random.Random) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    for split, n in (("train", 48), ("test", 12)):
        rows = []
        for _ in range(n):
            label = rng.choice(labels)
            words = [rng.choice(WORDS[label]), *rng.sample(FILLER, 3)]
            rng.shuffle(words)
            rows.append({"sentence": " ".join(words), "label": label})
        (folder / f"{split}.json").write_text(json.dumps(rows))


@pytest.fixture
def cl_dir(tmp_path: Path) -> Path:
    rng = random.Random(0)
    _write_task(tmp_path / "data", "sport_food", ["Sports", "Food"], rng)
    _write_task(tmp_path / "data", "food_weather", ["Food", "Weather"], rng)
    return tmp_path / "data"


def test_bench_writes_json_markdown_and_heat_maps(
    cl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main([
        "bench", "--data", str(cl_dir), "--order", "sport_food,food_weather",
        "--methods", "seq-lora,o-lora,multitask", "--model", "tiny", "--train-per-task", "32",
        "--eval-per-task", "8", "--set", "epochs=2", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    seq, olora, multi = results["methods"]
    assert [seq["method"], olora["method"], multi["method"]] == ["seq-lora", "o-lora", "multitask"]
    assert len(seq["matrix"]) == 2 and len(olora["matrix"]) == 2
    assert multi["matrix"] is None and len(multi["final_row"]) == 2
    assert all(0.0 <= v <= 1.0 for row in seq["matrix"] for v in row)
    # the summary follows from the matrix
    m = seq["matrix"]
    assert seq["average_accuracy"] == pytest.approx((m[1][0] + m[1][1]) / 2)
    assert seq["backward_transfer"] == pytest.approx(m[1][0] - m[0][0])
    assert results["config"]["hyperparams"] == {"epochs": 2}
    table = (out / "results.md").read_text()
    assert "| seq-lora |" in table and "| o-lora |" in table and "| multitask |" in table
    for method in ("seq-lora", "o-lora"):
        assert (out / f"matrix-{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "matrix-multitask.png").exists()
    captured = capsys.readouterr()
    printed = captured.out
    assert "| seq-lora |" in printed
    for who in ("base", "seq-lora", "o-lora", "multitask"):  # evaluation shows progress too
        assert f"{who} evaluating" in captured.err, who
    # the untrained base is measured once and shared: one baseline for both streams
    assert printed.count("untrained base:") == 1
    assert seq["baseline"] == olora["baseline"] and len(seq["baseline"]) == 2
    assert printed.count("seq-lora after task") == 2 and printed.count("o-lora after task") == 2


def test_a_stopped_bench_keeps_the_methods_it_finished(
    cl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bench runs take hours on a CPU: results.json is rewritten as each method finishes."""
    import workers.bench

    def stopped(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(workers.bench, "_multitask", stopped)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main([
            "bench", "--data", str(cl_dir), "--order", "sport_food,food_weather",
            "--methods", "seq-lora,multitask", "--model", "tiny", "--train-per-task", "16",
            "--eval-per-task", "4", "--out", str(out),
        ])  # fmt: skip
    kept = json.loads((out / "results.json").read_text())
    assert [m["method"] for m in kept["methods"]] == ["seq-lora"]
    assert len(kept["methods"][0]["matrix"]) == 2
    assert "| seq-lora |" in (out / "results.md").read_text()


def test_bench_exact_match_metric_and_method_options(cl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main([
        "bench", "--data", str(cl_dir), "--order", "sport_food,food_weather",
        "--methods", "o-lora,am-lora", "--model", "tiny", "--train-per-task", "16",
        "--eval-per-task", "4", "--set", "max_steps=2", "--metric", "exact",
        "--option", "o-lora.lambda1=0.25", "--option", "am-lora.sparsity_weight=0",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["metric"] == "exact"
    assert results["config"]["options"] == {
        "o-lora": {"lambda1": 0.25},
        "am-lora": {"sparsity_weight": 0},
    }
    for method in results["methods"]:
        # 4 examples per task: exact-match accuracies are multiples of 1/4
        assert all(4 * v == int(4 * v) for row in method["matrix"] for v in row)
    assert "metric exact" in (out / "results.md").read_text()


def test_bench_consolidates_after_task_k_through_the_fold_jobs_use(
    cl_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probed: dict[str, list[int]] = {}

    def spy(state: Any, **kwargs: Any) -> continual_fold.Fold:
        probed[kwargs["method"]] = [len(p) for p in kwargs["probes"]]
        return continual_fold.fold_state(state, **kwargs)

    monkeypatch.setattr(stream, "fold_state", spy)
    out = tmp_path / "out"
    code = main([
        "bench", "--data", str(cl_dir), "--order", "sport_food,food_weather",
        "--methods", "o-lora,composed", "--model", "tiny", "--train-per-task", "32",
        "--eval-per-task", "8", "--set", "max_steps=4", "--consolidate-after", "1",
        "--max-drop", "100", "--distill-steps", "5", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["consolidate_after"] == 1
    assert results["config"]["distill_steps"] == 5
    olora, composed = results["methods"]
    for method in (olora, composed):
        (fold,) = method["folds"]
        assert fold["after_task"] == 0 and fold["published"] is True
        assert fold["routed"] == method["matrix"][0]  # the state the fold started from
        assert len(fold["folded"]) == 2 and all(0 <= v <= 1 for v in fold["folded"])
        assert len(method["matrix"]) == 2  # the second task learned on the folded base
    # o-lora folds exactly, with its memory; composed (am-lora) weighs its adapter by its gate
    assert olora["folds"][0]["max_logit_diff"] < 1e-3 and olora["folds"][0]["mean_gates"] is None
    (gate,) = composed["folds"][0]["mean_gates"]
    assert 0 < gate < 1 and composed["folds"][0]["max_logit_diff"] is None
    # am-lora's fitted fold is then distilled from the routed state; an exact fold is not
    assert len(composed["folds"][0]["distill_losses"]) == 5
    assert olora["folds"][0]["distill_losses"] == []
    # the exact fold checks the first PROBES_PER_TASK pairs; the distillation trains on all 32
    assert probed == {"o-lora": [continual_fold.PROBES_PER_TASK], "am-lora": [32]}
    for method in ("o-lora", "composed"):
        assert (out / "adapters" / method / "fold-after-00" / "olora_memory").is_dir()
    assert (out / "adapters" / "composed" / "fold-after-00" / "olora_memory" /
            "router.safetensors").is_file()  # fmt: skip
    table = (out / "results.md").read_text()
    assert "composed: fold after sport_food, published" in table
    printed = capsys.readouterr()  # each fold is shown as soon as it is measured
    shown = printed.out + printed.err
    assert "composed fold after task 1 (published):" in shown
    # the fold is announced, and its distillation has a bar of its own (5 steps)
    assert "composed: folding tasks 1-1 into the base" in shown
    assert re.search(r"composed fold: distilling.*5/5", shown), shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "nope"], "method"),
        (["--order", "sport_food,missing"], "not found"),
        (["--set", "rank=-3"], "rank"),
        (["--set", "rank"], "KEY=VALUE"),
        (["--methods", "o-lora", "--option", "o-lora.nope=1"], "nope"),
        (["--methods", "o-lora", "--option", "o-lora.lambda1=-1"], "lambda1"),
        (["--methods", "seq-lora", "--option", "o-lora.lambda1=1"], "o-lora"),
        (["--methods", "seq-lora", "--option", "lambda1=1"], "METHOD.KEY=VALUE"),
        (["--consolidate-after", "1"], "consolidate_after"),  # one task: nothing comes after
        (["--max-drop", "-1"], "max_drop"),
        (["--distill-steps", "-1"], "distill_steps"),
        (["--methods", "composed", "--option", "composed.lambda1=-1"], "lambda1"),
    ],
)
def test_bench_refuses_bad_input_before_training(
    cl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = ["bench", "--data", str(cl_dir), "--order", "sport_food", "--model", "tiny",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
