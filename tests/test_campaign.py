"""Campaigns: identical results on serial, process-pool and Dask executors, shards that
merge back to the whole, failures kept as data, exact points."""
import numpy as np
import pytest

from nonsmooth.conservative._campaign import (
    Case,
    CampaignResult,
    make_cases,
    merge_results,
    parse_shard,
    resolve,
    run_campaign,
)

pytest.importorskip("torch")

EX = "nonsmooth.testing._examples"


def gradient_campaign():
    cases = make_cases([f"{EX}:abs_sum", f"{EX}:max_pair", f"{EX}:relu_difference"],
                       [[0.0, 1.5], [-2.0, -2.0], [0.1, 0.0]], dtypes=("float32", "float64"),
                       seeds=(0, 1), evaluate_kind="gradient")
    # A case that fails on purpose: max_pair needs two entries.
    cases.append(Case(f"{EX}:max_pair", [3.0], "float64", 0, "torch", "gradient"))
    return cases


def jac(result):
    return np.array([[float.fromhex(v) for v in row] for row in result.value["jacobian"]])


@pytest.fixture(scope="module")
def serial():
    return run_campaign(gradient_campaign(), executor="serial")


def test_serial_values_match_closed_forms(serial):
    by = {(r.case.function.split(":")[1], tuple(r.case.values.tolist()), r.case.dtype, r.case.seed): r
          for r in serial.results}
    # d sum|x| = sign(x); torch takes abs'(0) = 0.
    assert np.array_equal(jac(by["abs_sum", (0.0, 1.5), "float64", 0]), [[0.0, 1.0]])
    # A tie in elementwise maximum splits the gradient evenly in torch.
    assert np.array_equal(jac(by["max_pair", (-2.0, -2.0), "float32", 1]), [[0.5, 0.5]])
    # relu(x) - relu(-x) = x, yet AD gives 0 where an entry is exactly 0.
    assert np.array_equal(jac(by["relu_difference", (0.1, 0.0), "float64", 0]), [[1.0, 0.0], [0.0, 0.0]])
    # 0.1 in float32 is not 0.1: the evaluated value is the float32 rounding, exactly.
    val = [float.fromhex(v) for v in by["relu_difference", (0.1, 0.0), "float32", 0].value["value"]]
    assert val[0] == float(np.float32(0.1))
    assert serial.n_cases == len(gradient_campaign()) == 37
    failed = [r for r in serial.results if not r.ok]
    assert len(failed) == 1 and failed[0].error.startswith("IndexError")
    assert "failed: IndexError" in serial.explain()


def test_process_pool_gives_identical_results(serial):
    pooled = run_campaign(gradient_campaign(), max_workers=2, chunksize=5)
    assert pooled == serial
    assert pooled.executor.startswith("local processes")


def test_dask_local_cluster_gives_identical_results(serial):
    pytest.importorskip("dask.distributed")
    result = run_campaign(gradient_campaign(), executor="dask-local", max_workers=2)
    assert result == serial
    assert "LocalCluster" in result.executor


def test_shards_merge_back_to_the_whole(serial, tmp_path):
    paths = []
    for i in range(3):
        part = run_campaign(gradient_campaign(), executor="serial", shard=f"{i}/3")
        assert {r.index % 3 for r in part.results} == {i}
        path = tmp_path / f"shard{i}.jsonl"
        part.save(path)
        paths.append(path)
    merged = merge_results(paths)
    assert merged == serial
    with pytest.raises(ValueError, match="miss"):
        merge_results(paths[:2])
    # A shard whose result disagrees with another copy of the same case is refused.
    lines = paths[0].read_text().splitlines()
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join([lines[0], lines[1].replace('"ok": true', '"ok": false')]) + "\n")
    with pytest.raises(ValueError, match="different results"):
        merge_results(paths + [tampered])


def test_injected_evaluator_and_dict_cases():
    cases = [{"function": f"{EX}:abs_sum", "point": [-1.0, 2.0], "evaluate_kind": "gradient"}]
    r = run_campaign(cases, executor="serial", evaluate="nonsmooth.conservative._campaign:gradient_case")
    assert np.array_equal(jac(r.results[0]), [[-1.0, 1.0]])
    with pytest.raises(ValueError, match="'not-a-ref'"):
        run_campaign(cases, executor="serial", evaluate="not-a-ref")


def test_jax_cases_on_the_same_runner():
    pytest.importorskip("jax")
    cases = make_cases([f"{EX}:abs_sum"], [[0.0, -3.0]], dtypes=("float64",), framework="jax",
                       evaluate_kind="gradient")
    r = run_campaign(cases, executor="serial")
    # jax takes abs'(0) = 1 (and runs float64 inside enable_x64, not globally).
    assert np.array_equal(jac(r.results[0]), [[1.0, -1.0]])
    import jax.numpy as jnp
    assert jnp.zeros(1).dtype == jnp.float32


def test_cases_round_trip_exactly():
    c = Case(f"{EX}:abs_sum", np.array([0.1, -0.0, 5e-324]), "float64", 3, "torch", "gradient")
    assert c.point == ((0.1).hex(), (-0.0).hex(), (5e-324).hex())
    back = Case.from_json(c.to_json())
    assert back == c and np.array_equal(back.values, [0.1, -0.0, 5e-324])
    assert np.signbit(back.values[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(function="nocolon", point=[1.0]), "module:qualname"),
    (dict(function="m:f", point=[]), "at least one number"),
    (dict(function="m:f", point=["x"]), "float.hex"),
    (dict(function="m:f", point=[1.0], dtype="int8"), "'int8'"),
    (dict(function="m:f", point=[1.0], framework="mxnet"), "'mxnet'"),
    (dict(function="m:f", point=[1.0], seed=-1), "-1"),
])
def test_bad_cases_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Case(**kwargs)


def test_references_shards_and_executors_are_validated():
    assert resolve("math:sqrt")(9.0) == 3.0
    with pytest.raises(ValueError, match="<lambda>"):
        resolve("m:<lambda>")
    with pytest.raises(ValueError, match="'no_such_mod_zz'"):
        resolve("no_such_mod_zz:f")
    with pytest.raises(ValueError, match="'nothing_here'"):
        resolve("math:nothing_here")
    assert parse_shard("2/5") == (2, 5)
    with pytest.raises(ValueError, match="'5/5'"):
        parse_shard("5/5")
    with pytest.raises(ValueError, match="'two/3'"):
        parse_shard("two/3")
    with pytest.raises(TypeError, match="executor must be"):
        run_campaign([], executor=42)
    empty = run_campaign([], executor="serial")
    assert isinstance(empty, CampaignResult) and empty.n_cases == 0


def _audit_cases():
    try:
        from nonsmooth.conservative import audit  # noqa: F401
    except ImportError:
        pytest.importorskip("nonsmooth.conservative._audit")
    return make_cases([f"{EX}:relu_difference", f"{EX}:abs_sum"], [[0.0], [0.5]])


def test_audit_cases_give_the_engine_verdicts():
    serial = run_campaign(_audit_cases(), executor="serial")
    assert [r.ok for r in serial.results] == [True] * 4, serial.explain()
    verdicts = [r.value["verdict"] for r in serial.results]
    assert verdicts == ["SPURIOUS", "SMOOTH", "CLARKE", "SMOOTH"]
    assert serial.verdict_counts() == {"SPURIOUS": 1, "SMOOTH": 2, "CLARKE": 1}


@pytest.mark.slow
def test_audit_cases_serial_vs_processes():
    cases = _audit_cases()
    pooled, serial = run_campaign(cases, max_workers=2), run_campaign(cases, executor="serial")
    diffs = [(p.index, k) for p, s in zip(pooled.results, serial.results)
             for k in set(p.value or {}) | set(s.value or {})
             if (p.value or {}).get(k) != (s.value or {}).get(k)]
    assert pooled == serial, f"fields differing between executors: {diffs}; errors: " + \
        "; ".join(r.error for r in pooled.results + serial.results if not r.ok)


@pytest.mark.slow
def test_dask_scheduler_address_and_client(serial):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        by_address = run_campaign(gradient_campaign(), executor=cluster.scheduler_address)
        assert by_address == serial and cluster.scheduler_address in by_address.executor
        with distributed.Client(cluster) as client:
            assert run_campaign(gradient_campaign(), executor=client) == serial
