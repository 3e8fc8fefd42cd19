"""Genotypes: serialisation round trips, validation, loading, and discretisation of mixing weights."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from nasxserve.errors import GenotypeError
from nasxserve.nas.genotype import (DARTS_V1, DARTS_V2, GENOTYPES, PC_DARTS, PDARTS, Genotype, derive_genotype,
                                    derive_constrained, load_genotype, resolve_genotype)
from nasxserve.nas.ops import PRIMITIVES

NONE = PRIMITIVES.index("none")

# DARTS_V2 exactly as DARTS' genotypes.py writes it (concat fields as range(2, 6)).
DARTS_V2_SOURCE = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
    "normal_concat=range(2, 6), "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), "
    "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
    "reduce_concat=range(2, 6))"
)


def _valid_dict() -> dict:
    return DARTS_V2.to_dict()


# ----------------------------------------------------------------------------------------- round trips
def test_published_genotypes_are_the_four_known_cells():
    assert set(GENOTYPES) == {"DARTS_V1", "DARTS_V2", "PC_DARTS", "PDARTS"}
    assert GENOTYPES["DARTS_V1"] is DARTS_V1 and GENOTYPES["PDARTS"] is PDARTS
    for g in GENOTYPES.values():
        assert len(g.normal) == len(g.reduce) == 8
        assert g.steps == 4
        assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_json_round_trip(name):
    g = GENOTYPES[name]
    text = g.to_json()
    data = json.loads(text)
    assert data["normal"][0] == [g.normal[0][0], g.normal[0][1]]
    assert data["reduce_concat"] == [2, 3, 4, 5]
    back = Genotype.from_json(text)
    assert back == g
    assert back.normal == g.normal and back.reduce == g.reduce
    # edges come back as (str, int) tuples, not lists
    assert all(isinstance(e, tuple) and isinstance(e[0], str) and isinstance(e[1], int) for e in back.normal)


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_darts_string_round_trip(name):
    g = GENOTYPES[name]
    text = g.to_darts_string()
    assert text.startswith("Genotype(normal=[(")
    assert f"('{g.normal[0][0]}', {g.normal[0][1]})" in text
    assert Genotype.from_darts_string(text) == g


def test_json_wrapped_in_genotype_key():
    text = json.dumps({"genotype": PC_DARTS.to_dict(), "other": 1})
    assert Genotype.from_json(text) == PC_DARTS


def test_darts_string_with_range_concat():
    g = Genotype.from_darts_string(DARTS_V2_SOURCE)
    assert g == DARTS_V2
    assert g.normal_concat == (2, 3, 4, 5) and g.reduce_concat == (2, 3, 4, 5)


def test_darts_string_positional_fields_and_partial_range():
    text = ("Genotype([('skip_connect', 0), ('sep_conv_5x5', 1)], range(2, 3), "
            "[('avg_pool_3x3', 1), ('dil_conv_5x5', 0)], [2])")
    g = Genotype.from_darts_string(text)
    assert g.normal == (("skip_connect", 0), ("sep_conv_5x5", 1))
    assert g.reduce == (("avg_pool_3x3", 1), ("dil_conv_5x5", 0))
    assert g.normal_concat == (2,) and g.reduce_concat == (2,)
    assert g.steps == 1


# ----------------------------------------------------------------------------------------- validation
def test_unknown_operation_is_rejected_with_known_list():
    d = _valid_dict()
    d["normal"][3] = ["conv_7x7", 1]
    with pytest.raises(GenotypeError) as e:
        Genotype.from_dict(d)
    msg = str(e.value)
    assert "conv_7x7" in msg and "normal" in msg
    assert "sep_conv_3x3" in msg  # lists the known operations


def test_input_index_not_before_node_is_rejected():
    d = _valid_dict()
    # edge 2 belongs to node 3: it may read nodes 0..2 but not 3
    d["reduce"][2] = ["skip_connect", 3]
    with pytest.raises(GenotypeError, match=r"reduce.*node 3 cannot take input from node 3"):
        Genotype.from_dict(d)
    d = _valid_dict()
    d["normal"][0] = ["skip_connect", 2]   # node 2 reading itself
    with pytest.raises(GenotypeError, match="node 2 cannot take input from node 2"):
        Genotype.from_dict(d)
    d = _valid_dict()
    d["normal"][0] = ["skip_connect", -1]
    with pytest.raises(GenotypeError, match="node 2 cannot take input from node -1"):
        Genotype.from_dict(d)


def test_last_node_may_read_every_earlier_node():
    d = _valid_dict()
    d["normal"][6] = ["sep_conv_3x3", 4]
    d["normal"][7] = ["skip_connect", 0]
    assert Genotype.from_dict(d).normal[6] == ("sep_conv_3x3", 4)


def test_odd_number_of_edges_is_rejected():
    d = _valid_dict()
    d["normal"] = d["normal"][:7]
    with pytest.raises(GenotypeError, match="two edges per node, got 7 edges"):
        Genotype.from_dict(d)
    d = _valid_dict()
    d["reduce"] = []
    with pytest.raises(GenotypeError, match="two edges per node, got 0 edges"):
        Genotype.from_dict(d)


def test_bad_concat_and_mismatched_cells_are_rejected():
    d = _valid_dict()
    d["normal_concat"] = [2, 3, 4, 6]
    with pytest.raises(GenotypeError, match="normal_concat"):
        Genotype.from_dict(d)
    d = _valid_dict()
    d["reduce"] = d["reduce"][:6]
    d["reduce_concat"] = [2, 3, 4]
    with pytest.raises(GenotypeError, match="same number of nodes"):
        Genotype.from_dict(d)


def test_bad_json_is_rejected():
    with pytest.raises(GenotypeError, match="not valid JSON"):
        Genotype.from_json("{'normal': oops")


@pytest.mark.parametrize("text", ["[1, 2, 3]", "\"DARTS_V2\"", "42", "null"])
def test_json_that_is_not_an_object_is_rejected(text):
    with pytest.raises(GenotypeError, match="must be an object"):
        Genotype.from_json(text)


def test_json_object_missing_keys_or_malformed_edges():
    with pytest.raises(GenotypeError, match="expected keys normal, normal_concat, reduce, reduce_concat"):
        Genotype.from_json(json.dumps({"normal": [["skip_connect", 0]]}))
    d = _valid_dict()
    d["normal"][0] = ["skip_connect", 0, 5]
    with pytest.raises(GenotypeError, match="not a genotype"):
        Genotype.from_json(json.dumps(d))


def test_bad_darts_strings_are_rejected():
    with pytest.raises(GenotypeError, match="cannot parse"):
        Genotype.from_darts_string("Genotype(normal=[(")
    with pytest.raises(GenotypeError, match="looks like Genotype"):
        Genotype.from_darts_string("Cell(normal=[])")
    with pytest.raises(GenotypeError, match="unknown genotype field 'colour'"):
        Genotype.from_darts_string(DARTS_V2_SOURCE[:-1] + ", colour='red')")
    with pytest.raises(GenotypeError, match="unsupported expression"):
        Genotype.from_darts_string(DARTS_V2_SOURCE.replace("range(2, 6)", "__import__('os')", 1))
    with pytest.raises(GenotypeError, match="unknown operation 'conv_9x9'"):
        Genotype.from_darts_string(DARTS_V2_SOURCE.replace("dil_conv_3x3", "conv_9x9"))


def test_genotype_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DARTS_V2.normal = ()  # type: ignore[misc]


# ----------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("spelling", ["DARTS_V2", "darts_v2", "Darts_V2"])
def test_load_by_name_is_case_insensitive(spelling):
    assert load_genotype(spelling) is DARTS_V2


def test_load_every_published_name():
    for name, g in GENOTYPES.items():
        assert load_genotype(name.lower()) == g


def test_load_json_file(tmp_path):
    p = tmp_path / "cell.json"
    p.write_text(PDARTS.to_json(), encoding="utf-8")
    assert load_genotype(str(p)) == PDARTS


def test_load_darts_string_file(tmp_path):
    p = tmp_path / "cell.txt"
    p.write_text("\n  " + DARTS_V2_SOURCE + "\n", encoding="utf-8")
    assert load_genotype(str(p)) == DARTS_V2


def test_load_invalid_json_file_names_the_path(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json", encoding="utf-8")
    with pytest.raises(GenotypeError) as e:
        load_genotype(str(p))
    assert str(p) in str(e.value) and "JSON" in str(e.value)


def test_load_missing_file_or_unknown_name(tmp_path):
    with pytest.raises(GenotypeError) as e:
        load_genotype(str(tmp_path / "nope.json"))
    assert "nope.json" in str(e.value) and "DARTS_V2" in str(e.value)
    with pytest.raises(GenotypeError, match="no such file or directory, nor a published genotype"):
        load_genotype("DARTS_V3")
    with pytest.raises(GenotypeError, match="has no genotype.json"):
        load_genotype(str(tmp_path))  # a directory without a finished search


def test_load_the_darts_string_itself():
    """What nasx search prints is pasted into --genotype: the string is far longer than a file name may be."""
    text = PDARTS.to_darts_string()
    assert len(text) > 255
    assert load_genotype(text) == PDARTS
    assert load_genotype("  " + DARTS_V2_SOURCE) == DARTS_V2


def test_load_a_run_directory(tmp_path):
    (tmp_path / "genotype.json").write_text(PC_DARTS.to_json(), encoding="utf-8")
    assert resolve_genotype(str(tmp_path)) == (PC_DARTS, str(tmp_path / "genotype.json"))


def test_an_overlong_source_is_a_genotype_error_not_an_os_error():
    with pytest.raises(GenotypeError, match="no such file or directory"):
        load_genotype("x" * 5000)
    with pytest.raises(GenotypeError, match="cannot parse genotype string"):
        load_genotype("Genotype(normal=[('sep_conv_3x3', 0)" + " " * 5000)


# ----------------------------------------------------------------------------------------- derivation
def _reference_cell(w: np.ndarray, steps: int, scale=None) -> list[set]:
    """Independent discretisation: per node, the set of (op, input) of its top-2 incoming edges."""
    w = np.asarray(w, dtype=np.float64)
    if scale is not None:
        w = w * np.asarray(scale)[:, None]
    nodes, start = [], 0
    for i in range(steps):
        n_in = 2 + i
        scored = []
        for j in range(n_in):
            row = w[start + j]
            best_k = max((k for k in range(len(PRIMITIVES)) if k != NONE), key=lambda k: row[k])
            scored.append((row[best_k], j, PRIMITIVES[best_k]))
        scored.sort(key=lambda t: -t[0])
        nodes.append({(op, j) for _, j, op in scored[:2]})
        start += n_in
    return nodes


def _nodes(edges) -> list[set]:
    return [set(edges[2 * i:2 * i + 2]) for i in range(len(edges) // 2)]


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_derive_hand_made_two_step_cell():
    # steps=2: node 2 <- edges (0, 1); node 3 <- edges (0, 1, 2)
    #           none  max   avg   skip  sep3  sep5  dil3  dil5
    w = np.array([
        [0.90, 0.01, 0.01, 0.02, 0.03, 0.01, 0.01, 0.01],   # node2 <- 0: sep3 0.03 (none ignored)
        [0.50, 0.00, 0.30, 0.00, 0.00, 0.10, 0.05, 0.05],   # node2 <- 1: avg 0.30
        [0.10, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.60],   # node3 <- 0: dil5 0.60
        [0.95, 0.04, 0.00, 0.00, 0.00, 0.00, 0.00, 0.01],   # node3 <- 1: max 0.04 (none ignored)
        [0.20, 0.00, 0.00, 0.70, 0.05, 0.05, 0.00, 0.00],   # node3 <- 2: skip 0.70
    ])
    g = derive_genotype(w, w, steps=2, multiplier=2)
    assert _nodes(g.normal) == [{("sep_conv_3x3", 0), ("avg_pool_3x3", 1)},
                                {("dil_conv_5x5", 0), ("skip_connect", 2)}]
    assert g.reduce == g.normal
    assert g.normal_concat == g.reduce_concat == (2, 3)


def test_derive_never_chooses_none_even_when_it_dominates():
    rng = np.random.default_rng(0)
    for _ in range(5):
        wn = rng.random((14, 8))
        wr = rng.random((14, 8))
        wn[:, NONE] = 10.0 + rng.random(14)
        wr[:, NONE] = 10.0 + rng.random(14)
        g = derive_genotype(wn, wr)
        assert all(op != "none" for op, _ in g.normal + g.reduce)
        assert _nodes(g.normal) == _reference_cell(wn, 4)
        assert _nodes(g.reduce) == _reference_cell(wr, 4)
        assert g.normal_concat == (2, 3, 4, 5)


def test_derive_matches_reference_on_softmaxed_weights():
    rng = np.random.default_rng(1)
    wn = _softmax(rng.normal(size=(14, 8)) * 2)
    wr = _softmax(rng.normal(size=(14, 8)) * 2)
    g = derive_genotype(wn, wr)
    assert _nodes(g.normal) == _reference_cell(wn, 4)
    assert _nodes(g.reduce) == _reference_cell(wr, 4)
    # each node has two distinct inputs, both earlier nodes
    for i, node in enumerate(_nodes(g.normal) + _nodes(g.reduce)):
        inputs = {j for _, j in node}
        assert len(inputs) == 2 and max(inputs) < 2 + i % 4


def test_derive_ranks_edges_by_strongest_non_none_op():
    # node 3 (edges 2..4): edge from input 0 has the largest total and largest none, but its best
    # real op (0.20) is weaker than those of inputs 1 (0.30) and 2 (0.25)
    w = np.full((14, 8), 0.01)
    w[0, 4] = w[1, 4] = 0.5
    w[2] = [0.40, 0.20, 0.20, 0.20, 0.20, 0.20, 0.20, 0.20]
    w[3] = [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.30, 0.00]
    w[4] = [0.00, 0.25, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00]
    g = derive_genotype(w, w)
    assert set(g.normal[2:4]) == {("dil_conv_3x3", 1), ("max_pool_3x3", 2)}


def test_derive_ties_prefer_lower_inputs_and_first_op():
    uniform = np.full((14, 8), 1.0 / 8)
    g = derive_genotype(uniform, uniform)
    for i in range(4):
        assert set(g.normal[2 * i:2 * i + 2]) == {("max_pool_3x3", 0), ("max_pool_3x3", 1)}


def test_edge_scale_changes_edge_choice_but_not_op_choice():
    w = np.full((14, 8), 0.01)
    # node 2: inputs 0, 1 always chosen (only two)
    w[0, 3] = 0.9
    w[1, 5] = 0.9
    # node 3: input 0 (0.50, sep_conv_5x5) > input 1 (0.40, avg) > input 2 (0.30, dil3)
    w[2, 5] = 0.50
    w[3, 2] = 0.40
    w[4, 6] = 0.30
    plain = derive_genotype(w, w)
    assert set(plain.normal[2:4]) == {("sep_conv_5x5", 0), ("avg_pool_3x3", 1)}

    scale = np.ones(14)
    scale[2] = 0.5   # 0.50 -> 0.25: input 0 now ranks last
    g = derive_genotype(w, w, edge_scale_normal=scale)
    assert set(g.normal[2:4]) == {("avg_pool_3x3", 1), ("dil_conv_3x3", 2)}
    assert set(g.reduce[2:4]) == set(plain.reduce[2:4])          # reduce cell unscaled
    assert set(g.normal[:2]) == set(plain.normal[:2])            # node 2 unaffected

    scale_r = np.ones(14)
    scale_r[3] = 0.1
    g2 = derive_genotype(w, w, edge_scale_reduce=scale_r)
    assert set(g2.reduce[2:4]) == {("sep_conv_5x5", 0), ("dil_conv_3x3", 2)}
    assert g2.normal == plain.normal
    # scaling a whole edge never changes which op it gets
    rng = np.random.default_rng(2)
    wr = rng.random((14, 8))
    sc = rng.random(14) + 0.1
    assert _nodes(derive_genotype(wr, wr, edge_scale_normal=sc).normal) == _reference_cell(wr, 4, sc)


def test_derive_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(14, 8\)"):
        derive_genotype(np.zeros((13, 8)), np.zeros((14, 8)))
    with pytest.raises(ValueError):
        derive_genotype(np.zeros((14, 8)), np.zeros((14, 7)))


def test_derive_multiplier_sets_concat():
    rng = np.random.default_rng(3)
    w = rng.random((14, 8))
    assert derive_genotype(w, w, steps=4, multiplier=2).normal_concat == (4, 5)
    w3 = rng.random((9, 8))  # steps=3: 2 + 3 + 4 edges
    g = derive_genotype(w3, w3, steps=3, multiplier=3)
    assert g.normal_concat == (2, 3, 4) and g.steps == 3
    assert _nodes(g.normal) == _reference_cell(w3, 3)


def _pooled_cell(rng_seed: int = 0) -> np.ndarray:
    """Normal-cell weights whose DARTS derivation is all max pools: per node, inputs 0 and 1 hold a max pool
    (0.5 + 0.05 node) and a runner-up sep_conv_3x3 (0.2); every other entry is noise below 0.01."""
    w = np.random.default_rng(rng_seed).uniform(0, 0.01, (14, len(PRIMITIVES)))
    pool, sep = PRIMITIVES.index("max_pool_3x3"), PRIMITIVES.index("sep_conv_3x3")
    start = 0
    for i in range(4):
        w[start, pool], w[start + 1, pool] = 0.5 + 0.05 * i, 0.52 + 0.05 * i
        w[start, sep] = w[start + 1, sep] = 0.2
        start += 2 + i
    return w


def test_keeping_no_convolutions_is_darts_derivation():
    w = np.random.default_rng(1).dirichlet(np.ones(len(PRIMITIVES)), size=14)
    scale = np.random.default_rng(2).uniform(0.5, 1.5, 14)
    assert derive_constrained(w, w, 4, 4) == derive_genotype(w, w, 4, 4)
    scaled = derive_constrained(w, w, 4, 4, edge_scale_normal=scale, edge_scale_reduce=scale)
    assert scaled == derive_genotype(w, w, 4, 4, scale, scale)


def test_keeping_convolutions_replaces_the_weakest_pools_by_their_runners_up():
    w = _pooled_cell()
    assert derive_genotype(w, w, 4, 4).parametric("normal") == 0
    g = derive_constrained(w, w, 4, 4, min_convolutions=2)
    assert g.parametric("normal") == 2
    # the two weakest pools are node 2's (0.50 from input 0, 0.52 from input 1): both become the runner-up
    assert g.normal[:2] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
    assert all(op == "max_pool_3x3" for op, _ in g.normal[2:])
    assert g.reduce == derive_genotype(w, w, 4, 4).reduce      # the reduction cell is derived as DARTS does


def test_keeping_convolutions_ranks_a_nodes_edges_again():
    """Node 3's weakest pool (input 0) has only a weak runner-up (0.05), below input 2's convolution (0.3):
    node 3 takes inputs 1 and 2 instead, as P-DARTS' rule does for skips."""
    w = _pooled_cell()
    pool, sep, dil = (PRIMITIVES.index(n) for n in ("max_pool_3x3", "sep_conv_3x3", "dil_conv_3x3"))
    w[0, sep] = w[1, sep] = 0.0                   # node 2: pools with nothing but noise behind them
    w[2, pool], w[2, sep] = 0.4, 0.05            # node 3, input 0: the weakest pool, a weak runner-up
    w[4, dil] = 0.3                              # node 3, input 2: a convolution
    g = derive_constrained(w, w, 4, 4, min_convolutions=1)
    assert sorted(g.normal[2:4], key=lambda e: e[1]) == [("max_pool_3x3", 1), ("dil_conv_3x3", 2)]
    assert g.parametric("normal") == 1


def test_keeping_convolutions_stops_when_no_pool_has_an_alternative():
    w = np.zeros((14, len(PRIMITIVES)))
    w[:, PRIMITIVES.index("avg_pool_3x3")] = 1.0  # nothing else on any edge
    g = derive_constrained(w, w, 4, 4, min_convolutions=2)
    assert g.parametric("normal") == 0
