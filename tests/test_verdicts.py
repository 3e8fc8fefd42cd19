"""The plain verdicts of nasx evaluate and of the training run's summary (nasxserve.explain.verdicts)."""
from __future__ import annotations

import json
from pathlib import Path

from nasxserve.explain.verdicts import evaluation_verdicts, run_verdicts

DARTS_V2_CELL = {"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["sep_conv_3x3", 0], ["sep_conv_3x3", 1],
                            ["sep_conv_3x3", 1], ["skip_connect", 0], ["skip_connect", 0], ["dil_conv_3x3", 2]],
                 "normal_concat": [2, 3, 4, 5],
                 "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["skip_connect", 2], ["max_pool_3x3", 1],
                            ["max_pool_3x3", 0], ["skip_connect", 2], ["skip_connect", 2], ["max_pool_3x3", 1]],
                 "reduce_concat": [2, 3, 4, 5]}
POOLS_CELL = dict(DARTS_V2_CELL, normal=[["max_pool_3x3", 0], ["dil_conv_3x3", 1]] + [["avg_pool_3x3", 0]] * 6)


def _report(**kw):
    report = {"method": "nasxnet", "head": "prototype", "genotype": DARTS_V2_CELL, "num_prototypes": 20,
              "prototype_class_counts": {"0": 10, "1": 10}, "mislabelled_prototypes": []}
    return {**report, **kw}


def test_a_sound_run_has_no_poor_verdict():
    assert run_verdicts(_report(), distinct=20, convolutions=6, edges=8) == []


def test_each_poor_measure_of_a_run_is_one_line_with_its_docs():
    report = _report(prototype_class_counts={"0": 19, "1": 1}, mislabelled_prototypes=[3, 7])
    poor = run_verdicts(report, distinct=12, convolutions=1, edges=8)
    assert [v["measure"] for v in poor] == ["prototype labels", "prototypes per class", "duplicates", "normal cell"]
    assert all(v["verdict"] == "poor" and v["see"].startswith("docs/") for v in poor)
    assert poor[0]["says"] == "2 prototypes vote for a class other than the one they are shown with"
    assert poor[1]["says"] == "classes with fewer than two prototypes: 1 (1)"
    assert poor[2]["says"] == "12 distinct prototypes of 20"            # 60 % < 80 %
    assert poor[3]["says"].startswith("collapsed: 1 convolution(s) of 8 edges")
    assert run_verdicts(report, distinct=16, convolutions=2, edges=8)[2:] == []   # 80 % distinct; 2 convolutions


def test_evaluation_verdicts_at_their_thresholds():
    def judged(gap, se, inside, share):
        r = {"faithfulness": {"deletion": {"area_gap": gap, "area_gap_se": se},
                              "alignment": {"n": 10, "mass_in_box": inside, "box_share": share}}}
        return [v["verdict"] for v in evaluation_verdicts(r)]
    assert judged(-1.0, 0.4, 0.10, 0.10) == ["poor", "poor"]                  # gap below 0 by > 2 se; 1x chance
    assert judged(-0.5, 0.4, 0.15, 0.10) == ["inconclusive", "inconclusive"]  # within 2 se; 1.5x
    assert judged(1.0, 0.4, 0.20, 0.10) == ["fine", "fine"]                   # above 0 by > 2 se; 2x
    share = {"evidence": {"own_class_share": {"median": 0.89}, "mislabelled_prototypes": []}}
    assert [(v["measure"], v["verdict"]) for v in evaluation_verdicts(share)] == [("own-class evidence", "poor")]


def test_the_training_summary_prints_the_poor_verdicts(tmp_path: Path):
    from nasxserve.cli.train import _distinct_patches, _verdict_lines

    records = tmp_path / "records.json"
    records.write_text(json.dumps({"records": [{"sample": i % 5, "position": [0, 0]} for i in range(20)]}))
    lines = [str(t) for t in _verdict_lines(_report(genotype=POOLS_CELL), tmp_path, _distinct_patches(records))]
    assert lines[0] == "poor: duplicates: 5 distinct prototypes of 20 (see docs/evaluation.md#prototype-set)"
    assert lines[1].startswith("poor: normal cell: collapsed: 1 convolution(s) of 8 edges")
    assert lines[1].endswith("(see docs/method.md#collapse)")
    assert lines[2] == ("the deletion gap, the alignment and the own-class share of the evidence: nasx evaluate "
                        f"{tmp_path}")
    assert len(lines) == 3
