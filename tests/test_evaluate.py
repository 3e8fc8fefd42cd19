"""``nasx evaluate`` on a real finished run and on its bundle: the same model gives the same report,
the numbers agree with what training measured, and bad input gets a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nasxserve.data import load_dataset  # noqa: E402
from nasxserve.explain.evaluation import (  # noqa: E402
    EvaluationOptions,
    evaluate_model,
    load_evaluated,
    render_markdown,
)
from nasxserve.explain.verdicts import evaluation_verdicts  # noqa: E402


def run_data(ev):
    return load_dataset(ev.data.spec, ev.data.image_size, val_share=ev.data.val_share)


@pytest.fixture(scope="module")
def run_result(trained_digits_run: Path) -> dict:
    ev = load_evaluated(trained_digits_run)
    return evaluate_model(ev, run_data(ev), EvaluationOptions(deletion_steps=2, sanity_images=50), torch.device("cpu"))


def test_accuracy_matches_what_training_measured(run_result: dict, trained_digits_run: Path):
    report = json.loads((trained_digits_run / "report.json").read_text())
    acc = run_result["accuracy"]
    assert acc["prototype"]["top1"] == pytest.approx(report["test"]["prototype_acc"])
    assert acc["aux"]["top1"] == pytest.approx(report["test"]["aux_acc"])
    assert acc["prototype"]["top5"] >= acc["prototype"]["top1"]
    assert acc["projection"]["after"] == report["test"]["prototype_acc_after_projection"]
    assert run_result["data"]["n"] == report["test"]["n"]


def test_prototype_set_agrees_with_the_projection_records(run_result: dict, trained_digits_run: Path):
    records = json.loads((trained_digits_run / "prototypes" / "records.json").read_text())["records"]
    protos = run_result["prototypes"]
    report = json.loads((trained_digits_run / "report.json").read_text())
    assert protos["count"] == len(records)
    assert protos["per_class"] == report["prototype_class_counts"]
    sources = [(r["sample"], *r["position"]) for r in records]
    shared = len(sources) - len(set(sources))
    # every prototype projected onto an already used patch is at least one same-source duplicate pair
    assert protos["duplicates"]["same_source"] >= shared
    assert protos["duplicates"]["distinct"] <= len(set(sources))
    assert 0.0 <= protos["purity"]["mean"] <= 1.0


def test_bundle_and_run_give_the_same_report(run_result: dict, digits_bundle: Path):
    ev = load_evaluated(digits_bundle)
    assert ev.kind == "bundle"
    again = evaluate_model(ev, run_data(ev), EvaluationOptions(deletion_steps=2, sanity_images=50),
                           torch.device("cpu"))
    for section in ("accuracy", "prototypes", "localisation"):
        assert again[section] == run_result[section]
    protocols = zip(again["faithfulness"]["deletion_protocols"], run_result["faithfulness"]["deletion_protocols"])
    for protocol, first in protocols:
        assert (protocol["rule"], protocol["fill"]) == (first["rule"], first["fill"])
        for order in ("morf", "random", "lerf"):
            np.testing.assert_allclose(protocol["curves"][order], first["curves"][order], rtol=1e-4)
    aligned, first = again["faithfulness"]["alignment"], run_result["faithfulness"]["alignment"]
    assert aligned["n"] == first["n"] > 0
    assert aligned["mass_in_box"] == pytest.approx(first["mass_in_box"], rel=1e-4)


def test_markdown_report_has_every_section(run_result: dict):
    text = render_markdown(run_result)
    for heading in ("## Accuracy", "## Prototype set", "## Faithfulness", "## Background"):
        assert heading in text
    assert "Alignment (evidence rule) over 50 images" in text and "Alignment (activation rule) over 50 images" in text
    assert "| evidence | road |" in text and "| activation | mean |" in text
    assert "## Localisation" not in text           # digits have no part annotations


def test_cli_writes_json_and_markdown(nasx, trained_digits_run: Path, tmp_path: Path):
    md, js = tmp_path / "eval.md", tmp_path / "eval.json"
    proc = nasx("evaluate", trained_digits_run, "--limit", "60", "--deletion-steps", "1", "--sanity-images", "10",
                "--json", "--out", md, "--json-out", js, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads(js.read_text())
    assert printed["data"]["n"] == 60 and printed["accuracy"]["projection"] is not None
    assert md.read_text().startswith("# Evaluation of")
    assert printed["torch_threads"] == 1          # one thread on the CPU unless asked, as nasx train


def test_cli_threads_are_what_was_asked(nasx, trained_digits_run: Path):
    proc = nasx("evaluate", trained_digits_run, "--limit", "20", "--deletion-steps", "1", "--sanity-images", "5",
                "--json", "--device", "cpu", "--threads", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["torch_threads"] == 2


def test_markdown_printed_to_a_pipe_is_not_wrapped(env, trained_digits_run: Path, tmp_path: Path):
    """``nasx evaluate RUN > eval.md``: stdout is the markdown --out writes, line for line, at any COLUMNS;
    wrapped at the terminal's width, the tables' long rows broke in two."""
    from conftest import run_nasx

    md = tmp_path / "eval.md"
    proc = run_nasx(["evaluate", trained_digits_run, "--limit", "60", "--deletion-steps", "1", "--sanity-images",
                     "10", "--device", "cpu", "--out", md], dict(env, COLUMNS="40"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == md.read_text()
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert rows and all(line.endswith("|") for line in rows)
    assert max(len(line) for line in rows) > 80                  # long enough that wrapping would have cut them


def test_cli_errors_are_one_clear_line(nasx, tmp_path: Path, trained_digits_run: Path):
    proc = nasx("evaluate", tmp_path)
    assert proc.returncode == 2 and "neither a finished run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = nasx("evaluate", trained_digits_run, "--data", "imagefolder:" + str(tmp_path / "missing"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = nasx("evaluate", trained_digits_run, "--split", "bogus")
    assert proc.returncode == 2 and "--split" in proc.stderr


def test_data_of_another_size_is_refused(trained_digits_run: Path):
    from nasxserve.errors import EvaluationError

    ev = load_evaluated(trained_digits_run)
    with pytest.raises(EvaluationError, match="trained on 8x8 images"):
        evaluate_model(ev, load_dataset("digits", 16), EvaluationOptions(), torch.device("cpu"))


def _pct_of(dep: dict) -> str:
    return f"{100 * dep['drop_part']:.1f}%"


def test_localisation_reports_h1_class_activation_boxes_beside_the_prototypes():
    from nasxserve.contracts import DataSettings
    from nasxserve.data.base import Dataset, ImageSet
    from nasxserve.explain.evaluation import Evaluated
    from test_metrics import spot_images, spot_model

    spots, blocks = spot_images(12)
    images = ImageSet(spots.images.numpy(), spots.labels.numpy(), (0.0,), (1.0,), boxes=blocks)
    model = spot_model()
    with torch.no_grad():
        model.aux_head.weight.copy_(torch.tensor([[-1.0], [1.0]]))   # h1 weighs the block down: its box misses
    ev = Evaluated(path=Path("spots"), kind="run", model=model, method="nasxnet", head="prototype", sources=None,
                   saved_test=None, data=DataSettings(), has_aux=True, image_size=(20, 20))
    data = Dataset("spots", ["spot", "none"], train=images, test=images, mean=(0.0,), std=(1.0,), part_boxes=True)
    options = EvaluationOptions(deletion_steps=1, sanity_images=4)
    result = evaluate_model(ev, data, options, torch.device("cpu"))
    loc = result["localisation"]
    activation = loc["by_rule"]["activation"]
    assert activation["hit_rate"] == 1.0 and activation["mean_iou"] == pytest.approx(1.0)   # the block itself
    # hiding any one pixel of the block leaves the others matching as well: no single cell is the evidence,
    # and the evidence rule says so with the whole image (IoU 20 / 400)
    assert loc["rule"] == "evidence" and loc["hit_rate"] == 0.0 and loc["mean_iou"] == pytest.approx(0.05)
    ref = loc["aux_reference"]
    # every pixel but the block ties for h1's top 5%: the box is the whole image, IoU 20 / 400
    assert ref["hit_rate"] == 0.0 and ref["mean_iou"] == pytest.approx(0.05)
    # yet the similarity needs the block: hiding it costs most of it, hiding elsewhere nothing. The evidence
    # is on the part and the evidence rule misses it, which is what the report must let a reader tell apart
    dep = loc["part_dependence"]
    assert dep["n"] == 12 and dep["drop_part"] > 0.9 and dep["drop_random"] < 0.05 and dep["part_larger"] >= 0.9
    text = render_markdown(result)
    assert "activation rule overlaps the ground-truth part box with IoU >= 0.5 in 100.0% of 12 images" in text
    assert "h1 (Zhou et al., CVPR 2016) overlaps the part box" in text
    assert f"Hiding the part box (ROAD fill) lowers the top prototype's similarity by a median {_pct_of(dep)}" in text
    ev.has_aux = False
    assert evaluate_model(ev, data, options, torch.device("cpu"))["localisation"]["aux_reference"] is None


def test_background_is_measured_on_digits_by_each_rule_and_for_the_prototypes(run_result: dict):
    from nasxserve.data.foreground import on_background

    b = run_result["background"]
    assert set(b["top_regions"]) == {"evidence", "activation"} and b["below_share"] == 0.1
    assert all(0.0 <= v <= 1.0 for v in b["top_regions"].values()) and 0.0 <= b["prototypes"] <= 1.0
    foreground = np.zeros((2, 8, 8), bool)
    foreground[:, 2:6, 2:6] = True
    assert on_background(np.asarray([[0, 0, 2, 2], [1, 1, 4, 4]]), foreground).tolist() == [True, False]


def test_the_report_ends_with_a_verdict_per_measure(run_result: dict):
    by_measure = {v["measure"]: v for v in run_result["verdicts"]}
    assert {"deletion gap", "alignment", "own-class evidence", "duplicates"} <= set(by_measure)
    d = run_result["faithfulness"]["deletion"]
    gap, se = d["area_gap"], d["area_gap_se"]
    expected = "poor" if gap + 2 * se < 0 else "fine" if gap - 2 * se > 0 else "inconclusive"
    assert by_measure["deletion gap"]["verdict"] == expected
    md = render_markdown(run_result)
    verdict_lines = md.split("## Verdicts\n\n", 1)[1].strip().splitlines()
    assert len(verdict_lines) == len(run_result["verdicts"])
    assert all(line.startswith("- **") and "docs/evaluation.md#" in line for line in verdict_lines)


@pytest.mark.parametrize("gap, se, mass, box, expected", [
    (-0.5, 0.1, 0.10, 0.09, ("poor", "poor")),          # the digits run: gap -1.977, 9.9 % in 8.7 %
    (0.5, 0.1, 0.40, 0.10, ("fine", "fine")),
    (0.1, 0.1, 0.15, 0.10, ("inconclusive", "inconclusive")),
])
def test_verdict_thresholds(gap, se, mass, box, expected):
    report = {"faithfulness": {"deletion": {"area_gap": gap, "area_gap_se": se},
                               "alignment": {"n": 10, "mass_in_box": mass, "box_share": box}},
              "prototypes": {"count": 100, "duplicates": {"distinct": 65}, "per_class": {"0": 12, "1": 1}},
              "evidence": {"own_class_share": {"median": 0.5}, "mislabelled_prototypes": []}}
    by_measure = {v["measure"]: v["verdict"] for v in evaluation_verdicts(report)}
    assert (by_measure["deletion gap"], by_measure["alignment"]) == expected
    assert by_measure["duplicates"] == "poor" and by_measure["own-class evidence"] == "poor"
    assert by_measure["prototypes per class"] == "poor" and "prototype labels" not in by_measure
