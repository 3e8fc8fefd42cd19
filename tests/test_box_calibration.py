"""Box calibration (--extension box-calibration) on models whose evidence is known by hand."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import read_jsonl, write_manifest
from nasxserve.errors import ConfigError
from nasxserve.explain import localisation as L
from nasxserve.explain import metrics as M
from nasxserve.boxes import activation_boxes, cell_centres, move_boxes, peak_cells, shift_boxes
from nasxserve.explain.calibration import best_box_origins, evidence_offsets
from nasxserve.protos.projection import ProjectionRecord, calibrate_records
from nasxserve.training.config_loading import load_config
from test_metrics import Pixels, Shifted, off_spot_model, spot_images, spot_model


def test_shifted_boxes_move_and_are_cut_by_the_image():
    boxes = np.array([[2, 3, 6, 8]] * 3)
    moved = shift_boxes(boxes, np.array([[1, -2], [-5, 0], [10, 10]]), (10, 10))
    np.testing.assert_array_equal(moved, [[3, 1, 7, 6],      # moved as asked
                                          [0, 3, 1, 8],      # cut at the left edge
                                          [9, 9, 10, 10]])   # moved wholly out: its last pixel kept


def test_a_box_cut_by_the_edge_is_completed_about_its_peak_when_it_moves_away():
    # 8 x 8 image; a box cut by the top edge, y 0-3 around a peak at y 0.5, would reach y -2 if it went on past
    # the edge as it goes below the peak; moved down 3 it becomes y 1-6, not y 3-6
    boxes = np.array([[2, 0, 5, 3]] * 3)
    peaks = np.array([[3.5, 0.5]] * 3)
    moved = move_boxes(boxes, peaks, np.array([[0, 3], [0, -1], [2, 0]]), (8, 8))
    np.testing.assert_array_equal(moved, [[2, 1, 5, 6],      # completed to y -2, then moved down by 3
                                          [2, 0, 5, 2],      # moving up, toward the edge: only cut
                                          [4, 0, 7, 3]])     # moving right: the top edge is not in its way
    # a box the edge does not cut moves as it is
    np.testing.assert_array_equal(move_boxes(np.array([[2, 2, 5, 5]]), np.array([[3.5, 3.5]]), np.array([[0, 3]]),
                                             (8, 8)), [[2, 5, 5, 8]])


def test_activation_boxes_with_offsets_are_the_plain_boxes_shifted():
    maps = np.random.default_rng(0).random((4, 5, 5))
    plain = np.asarray(activation_boxes(maps, (20, 20)))
    offsets = np.array([[0, 0], [3, -1], [-2, 2], [40, 0]])
    np.testing.assert_array_equal(activation_boxes(maps, (20, 20), offsets=offsets),
                                  move_boxes(plain, peak_cells(maps, (20, 20)), offsets, (20, 20)))
    np.testing.assert_array_equal(activation_boxes(maps, (20, 20), offsets=np.zeros((4, 2), int)), plain)


def test_best_box_holds_all_of_lopsided_evidence_where_its_peak_would_not():
    # a right triangle of evidence in the 4 x 4 square at x 3-6, y 2-5, heaviest in its bottom-left corner: the one
    # 4 x 4 box holding all of it is that square, while a box centred on its peak or its centroid would cut it
    saliency = torch.zeros(1, 12, 12)
    for row in range(4):
        saliency[0, 2 + row, 3:3 + row + 1] = 1.0 + row
    np.testing.assert_allclose(best_box_origins(saliency, np.array([[4, 4]])), [[3.0, 2.0]])


def test_evidence_smaller_than_its_box_centres_it_and_sizes_are_kept_apart():
    # one pixel at (x 5, y 6): every 3 x 3 box holding it ties, their mean corner puts it in the middle; the
    # second image's 2 x 4 box sees its own two pixels at x 1-2, y 7 (every box holding both ties again)
    saliency = torch.zeros(2, 12, 12)
    saliency[0, 6, 5] = 1.0
    saliency[1, 7, 1:3] = 1.0
    np.testing.assert_allclose(best_box_origins(saliency, np.array([[3, 3], [2, 4]])), [[4.0, 5.0], [1.0, 5.5]])


def test_offset_of_evidence_at_the_corner_of_its_box():
    # the similarity's maximum is the 4 x 5 block's top-left pixel and depends on it alone, while the box is the
    # block: the gradient's peak is that pixel's centre, (-1.5, -2.0) from the box centre, -2 px once rounded
    images, _ = spot_images(10)
    offsets = evidence_offsets(off_spot_model(Pixels()), images, batch_size=4)
    np.testing.assert_array_equal(offsets, [[-2, -2],    # class 0's prototype, top evidence of every image
                                            [0, 0]])     # class 1's, top evidence of none: not moved


def test_calibration_moves_boxes_of_displaced_evidence_back_onto_it():
    # Shifted(k) draws every box k pixels right of and below its evidence; calibrated, its boxes are exactly
    # those of the undisplaced model, calibrated too
    images, blocks = spot_images(40, seed=1)
    k = 6
    whole = images.subset(np.flatnonzero(Shifted(k).keeps_whole(blocks)))
    boxes = {}
    for name, features in (("plain", Pixels()), ("shifted", Shifted(k))):
        model = off_spot_model(features)
        offsets = evidence_offsets(model, whole, batch_size=8)
        scan = M.scan(model, whole)
        boxes[name] = L.top_boxes(scan.top_maps, (20, 20), offsets[scan.top_prototype])
        boxes[name + " offset"] = offsets[0]
    np.testing.assert_array_equal(boxes["shifted offset"], np.rint([-1.5 - k, -2.0 - k]))
    np.testing.assert_array_equal(boxes["shifted"], boxes["plain"])
    assert len(whole) >= 5


def test_evidence_without_a_gradient_leaves_the_boxes_where_they_are():
    images, _ = spot_images(10)
    offsets = evidence_offsets(spot_model(), images)    # exact matches: distance 0, no input gradient
    np.testing.assert_array_equal(offsets, np.zeros((2, 2)))


def test_calibrated_records_carry_their_offset_and_the_moved_source_box():
    records = [ProjectionRecord(prototype=j, sample=j, position=(0, 0), source_class=0, class_before=0, distance=0.0,
                                box_xyxy=(4, 4, 8, 8)) for j in range(2)]
    moved = calibrate_records(records, np.array([[2, -1], [0, 0]]), (5, 5), (10, 10))
    assert moved[0].box_xyxy == (6, 3, 10, 7) and moved[0].box_offset == (2, -1)
    assert moved[1].box_xyxy == (4, 4, 8, 8) and moved[1].box_offset == (0, 0)
    assert records[0].box_offset == (0, 0)              # the records given are left as they were


@pytest.mark.parametrize("overrides,fragment", [
    ({"extensions": {"enabled": ["box-calibration"]}, "retrain": {"head": "linear"}}, "black box"),
    ({"extensions": {"enabled": ["box-calibration"]}, "method": "protopnet"}, "ProtoPNet"),
])
def test_config_refuses_calibration_without_prototype_boxes(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_runtime_draws_each_prototypes_box_moved_by_its_offset(digits_bundle: Path, digit_pngs, tmp_path: Path):
    from nasxserve.runtime.bundle import load_bundle

    moved_bundle = tmp_path / "bundle"
    shutil.copytree(digits_bundle, moved_bundle)
    manifest = json.loads((moved_bundle / "manifest.json").read_text())
    offsets = np.array([[1 + j % 3, -(j % 2)] for j in range(len(manifest["prototypes"]))])
    for p, offset in zip(manifest["prototypes"], offsets):
        p["box_offset"] = offset.tolist()
    write_manifest(moved_bundle, manifest)
    plain, moved = load_bundle(digits_bundle, "cpu"), load_bundle(moved_bundle, "cpu")
    assert (plain.width, plain.height) == (8, 8)         # the caller's pixels are the model's: no rescaling
    # the offsets move the activation rule's boxes; the evidence rule measures where the evidence is
    before = plain.explain([digit_pngs[0]], top_prototypes=6, regions="activation")[0]["explanations"][0]["evidence"]
    after = moved.explain([digit_pngs[0]], top_prototypes=6, regions="activation")[0]["explanations"][0]["evidence"]
    assert [e["prototype"] for e in after] == [e["prototype"] for e in before]
    grid = (manifest["latent_grid"]["height"], manifest["latent_grid"]["width"])
    peaks = cell_centres(np.array([e["latent_position"] for e in before]), grid, (8, 8))
    expected = move_boxes(np.array([e["box"] for e in before]), peaks, offsets[[e["prototype"] for e in before]],
                          (8, 8))
    np.testing.assert_array_equal([e["box"] for e in after], expected)
    assert any(e["box"] != b["box"] for e, b in zip(after, before))


def test_cli_train_with_calibration_records_offsets_for_the_bundle_and_evaluate(nasx, tmp_path: Path, tiny_yaml):
    out = tmp_path / "run"
    proc = nasx("train", "--config", tiny_yaml(), "--genotype", "DARTS_V2", "--retrain-epochs", "1,1",
                "--extension", "box-calibration", "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["extensions"]["enabled"] == ["box-calibration"]
    assert json.loads((out / "report.json").read_text())["extensions"] == {"box_calibration": True}
    records = json.loads((out / "prototypes" / "records.json").read_text())["records"]
    assert all(len(r["box_offset"]) == 2 for r in records)
    projection = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "projection"][-1]
    moved = sum(1 for r in records if r["box_offset"] != [0, 0])
    assert projection["box_calibration"]["prototypes_moved"] == moved
    evaluated = nasx("evaluate", out, "--limit", "40")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Boxes calibrated" in evaluated.stdout
    refused = nasx("train", "--config", tiny_yaml(), "--head", "linear", "--extension", "box-calibration", "--out",
                   tmp_path / "linear")
    assert refused.returncode != 0 and "black box" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "linear").exists()
