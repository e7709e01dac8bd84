"""Parity against circuit-tracer 0.5.0 in its isolated reference environment.

The first run builds the environment (tests/reference/build_env.sh: about 1.5 min with the
wheels in pip's cache); afterwards each 8-token, 200-node case (ReLU transcoders, skip
transcoders) takes about 50 s, most of it loading the model twice, once per environment.
"""

from __future__ import annotations

import pytest

from tests.reference.parity import run_parity

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("skip", "shipped"),
    [(False, False), (True, False), (False, True)],
    ids=["relu", "skip", "shipped"],
)
def test_parity_with_circuit_tracer(skip: bool, shipped: bool) -> None:
    """Random ReLU and skip transcoders, and the catalog's trained JumpReLU transcoders."""
    report = run_parity(
        n_tokens=8, max_feature_nodes=200, batch_size=64, skip=skip, shipped=shipped
    )
    assert report["active_identical"], report
    assert report["logits_identical"], report
    assert report["logit_prob_max_abs"] <= 1e-4, report
    assert report["selected_overlap"] >= 0.95, report
    assert report["edge_max_abs_diff"] <= report["edge_tolerance"], report
    assert report["passed"], report
    # the viewer JSON matches circuit-tracer's create_graph_files output
    assert report["json_keys_equal"], report
    assert report["json_prompt_tokens_equal"], report
    assert report["json_node_fields_differ"] == [], report
    assert report["json_nodes_jaccard"] >= 0.95, report
    assert report["json_links_jaccard"] >= 0.95, report
