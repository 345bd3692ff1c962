"""`nonsmooth campaign --shard` + `campaign-merge` give what one unsharded run gives."""
import json

import pytest

from nonsmooth.conservative._campaign import make_cases, merge_results, run_campaign
from nonsmooth.reports._cli import main as cli_main

pytest.importorskip("torch")


def test_sharded_cli_campaign_merges_to_the_unsharded_result(tmp_path, capsys):
    points = [[1.0, 1.0], [0.0, 1.5], [2.0, -1.5], [-0.0, 0.0]]
    cases = make_cases(["nonsmooth.testing._examples:max_pair", "nonsmooth.testing._examples:abs_sum"],
                       points, evaluate_kind="gradient")
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([c.to_json() for c in cases]))
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        assert cli_main(["campaign", str(spec), "--executor", "serial", "--shard", f"{i}/3",
                         "--out", str(out)]) == 0
        shards.append(str(out))
    merged_path = tmp_path / "merged.jsonl"
    assert cli_main(["campaign-merge", *shards, "--out", str(merged_path)]) == 0
    whole = run_campaign(cases, executor="serial")
    merged = merge_results([merged_path])
    assert [r.value for r in merged.results] == [r.value for r in whole.results]
    assert len(merged.results) == len(cases) == 8
    # torch splits a tie of maximum evenly: 1/2 each, an independent closed-form fact
    assert whole.results[0].value["jacobian"] == [[(0.5).hex(), (0.5).hex()]]


def test_campaign_cli_rejects_a_missing_file(tmp_path, capsys):
    assert cli_main(["campaign", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
