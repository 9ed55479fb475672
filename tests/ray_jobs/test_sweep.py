"""``k2pipe sweep``: the verdict rule on given numbers, the report on synthetic results (grids, tokens to
match), the sweep file's errors, the bundled sweeps' configs, and a 2-variant, 1-seed smoke sweep through
the real DAG (embedded Ray, local MLflow) that is then resumed, reported again, and carried over through its
runs.json to another storage root and tracking server."""

from __future__ import annotations

import json
import textwrap

import pytest

from pipelines.config import ConfigError
from pipelines.sweep import (
    Claim,
    Member,
    Sweep,
    Variant,
    _compared,
    _plotted,
    build_report,
    load_sweep,
    member_config,
    members,
    run_sweep,
    verdict,
)


def test_the_verdict_rule():
    borne = verdict([0.10, 0.12, 0.09])
    assert borne["borne_out"] and borne["verdict"] == "borne out"
    assert borne["mean"] == pytest.approx(0.10333333) and borne["se"] == pytest.approx(0.00881917, rel=1e-5)
    mixed = verdict([0.10, -0.01, 0.20])  # mean 0.097, se 0.061: under 2 standard errors, and a sign flips
    assert not mixed["borne_out"] and mixed["verdict"] == "not borne out at this scale"
    wide = verdict([0.01, 0.30, 0.02])  # every sign positive, but mean 0.11 < 2 x se 0.19
    assert not wide["borne_out"]
    opposite = verdict([-0.10, -0.12, -0.09])
    assert not opposite["borne_out"] and "opposite" in opposite["verdict"]
    one = verdict([0.5])
    assert not one["borne_out"] and "fewer than 2 seeds" in one["verdict"]


def _result(loss: float, tokens: float = 1000.0) -> dict:
    return {"metrics": {"final/val_loss": loss, "final/train_loss": loss, "final/max_logit": 5.0,
                        "final/tokens_trained": tokens}, "series": {}, "tokens_per_step": 10, "tau": 100.0}


def test_the_report_takes_each_side_at_its_best_grid_point_and_says_where_it_lies():
    sweep = Sweep(name="s", base="ci", overrides={}, seeds=(0, 1, 2),
                  variants={"a": Variant("a", {}, {"train.lr": [1, 2, 3]}),
                            "b": Variant("b", {}, {"train.lr": [1, 2]})},
                  claims=(Claim("a beats b", "a", "b", metric="final/val_loss"),))
    runs = members(sweep)
    loss = {("a", 1): 3.0, ("a", 2): 2.0, ("a", 3): 2.5, ("b", 1): 2.6, ("b", 2): 2.9}
    results = {m.run_name: _result(loss[(m.variant, m.point["train.lr"])] + 0.01 * m.seed) for m in runs}
    report = build_report(sweep, runs, {}, results)
    claim = report["claims"][0]
    assert claim["borne_out"] and claim["diffs"] == pytest.approx([0.6, 0.6, 0.6])
    assert "`a` at its best grid point {'train.lr': 2}: train.lr inside." in report["text"]
    assert "`b` at its best grid point {'train.lr': 1}: train.lr on the edge." in report["text"]
    # The plot draws the points the claim compares: each side's best grid point, every seed.
    drawn = [m.run_name for m in _plotted(sweep, runs, {k: {**v, "series": {"train/loss": [(1, 1.0)]}}
                                                        for k, v in results.items()}, sweep.claims[0])]
    assert sorted(drawn) == ["s-a-lr2-s0", "s-a-lr2-s1", "s-a-lr2-s2", "s-b-lr1-s0", "s-b-lr1-s1", "s-b-lr1-s2"]
    partial = build_report(sweep, runs, {}, {k: v for k, v in results.items() if not k.endswith("s2")})
    assert partial["finished"] == 10 and len(partial["missing"]) == 5 and "Not finished (5)" in partial["text"]
    assert partial["claims"][0]["n"] == 2


def test_a_series_claim_plots_its_series_and_a_metric_claim_the_loss():
    from pipelines.sweep import _claim_plot

    sweep = Sweep(name="s", base="ci", overrides={}, seeds=(0, 1), variants={"a": Variant("a", {}, {}),
                                                                             "b": Variant("b", {}, {})},
                  claims=())
    runs = members(sweep)
    balance = Claim("a balances better", "a", "b", series="moe/load_imbalance", over_steps=2)
    loss = Claim("a beats b", "a", "b", metric="final/val_loss")
    only_balance = {m.run_name: {**_result(1.0), "series": {"moe/load_imbalance": [(1, 2.0), (2, 1.5), (3, 1.2)]}}
                    for m in runs}
    png = _claim_plot(sweep, runs, only_balance, balance)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert _claim_plot(sweep, runs, only_balance, loss) is None, "no training loss to plot"
    only_loss = {m.run_name: {**_result(1.0), "series": {"train/loss": [(1, 3.0), (2, 2.0)]}} for m in runs}
    assert _claim_plot(sweep, runs, only_loss, balance) is None, "the loss is not the claim's series"
    assert _claim_plot(sweep, runs, only_loss, loss) is not None


def test_loss_rise_is_the_worst_window_over_the_best_before_it():
    from pipelines.sweep import loss_rise

    def windows(*means):  # two points a window, each window's mean as given
        return [(2 * i + j + 1, m + (0.1 if j else -0.1)) for i, m in enumerate(means) for j in range(2)]

    spike = loss_rise(windows(5.0, 4.0, 4.5, 3.5, 4.7, 3.0), window=2)
    assert spike["best"] == pytest.approx(3.0) and spike["last"] == pytest.approx(3.0)
    assert spike["rise"] == pytest.approx(1.2) and spike["at_step"] == 10  # 4.7 after the best 3.5
    # the worst point over the median of the 2 before it: 4.6 (step 9) over 3.4 and 3.6
    assert spike["spike"] == pytest.approx(1.1) and spike["spike_step"] == 9
    smooth = loss_rise(windows(5.0, 4.0, 3.0), window=2)
    assert smooth["rise"] == 0.0 and smooth["at_step"] is None
    assert smooth["spike"] == 0.0 and smooth["spike_step"] is None  # no point above the 2 before it
    assert loss_rise(windows(5.0), window=2) is None and loss_rise([], window=2) is None
    assert loss_rise(windows(5.0, 4.0) + [(5, 9.0)], window=2)["rise"] == 0.0, "a part window is left out"

    sweep = Sweep(name="r", base="ci", overrides={}, seeds=(0,),
                  variants={"a": Variant("a", {}), "b": Variant("b", {})},
                  claims=(Claim("a is stable", "a", "b", metric="final/val_loss", details=("loss_rise",)),))
    runs = members(sweep)
    series = {"r-a-s0": [(i, 5.0 - 0.05 * i) for i in range(1, 41)], "r-b-s0": [(i, 4.0) for i in range(1, 21)]
              + [(i, 6.0) for i in range(21, 41)]}
    text = build_report(sweep, runs, {}, {n: {**_result(1.0), "series": {"train/loss": v}}
                                          for n, v in series.items()})["text"]
    assert "| `r-a-s0` | 3.475 | 3.475 | +0.000 | - | +0.000 | - |" in text
    assert "| `r-b-s0` | 4.000 | 6.000 | +2.000 | 40 | +2.000 | 21 |" in text


def test_tokens_to_match_is_the_smallest_complete_run_that_reaches_the_baseline():
    sweep = Sweep(name="t", base="ci", overrides={}, seeds=(0, 1),
                  variants={"short": Variant("short", {}, {"train.steps": [10, 20, 30]}), "base": Variant("base", {})},
                  claims=(Claim("fewer tokens", "short", "base", metric="final/val_loss", kind="tokens_to_match"),))
    runs = members(sweep)
    losses = {10: 3.0, 20: 2.45, 30: 2.2}
    results = {}
    for m in runs:
        if m.variant == "short":
            results[m.run_name] = _result(losses[m.point["train.steps"]], tokens=100.0 * m.point["train.steps"])
        else:
            results[m.run_name] = _result(2.5 + 0.02 * m.seed, tokens=4000.0)
    report = build_report(sweep, runs, {}, results)
    claim = report["claims"][0]
    assert claim["diffs"] == [2000.0, 2000.0] and claim["borne_out"]  # 20 steps reach 2.5 and 2.52, 10 do not
    assert ("| seed | baseline final | baseline tokens | variant at 10 steps | variant at 20 steps | "
            "variant at 30 steps | tokens the variant needs |") in report["text"]
    assert "| 0 | 2.5000 | 4,000 | 3.0000 | 2.4500 | 2.2000 | 2,000 |" in report["text"]
    # A tokens_to_match variant's plot draws its whole grid over steps.
    drawn = _plotted(sweep, runs, {k: {**v, "series": {"train/loss": [(1, 1.0)]}} for k, v in results.items()},
                     sweep.claims[0])
    assert len(drawn) == len(runs) == 8
    assert "is a bound" not in report["text"]
    # When the shortest run already reaches the baseline, the need is only a bound, and the report says so.
    for m in runs:
        if m.variant == "short" and m.point["train.steps"] == 10:
            results[m.run_name] = _result(2.4, tokens=1000.0)
    text = build_report(sweep, runs, {}, results)["text"]
    assert "| 1 | 2.5200 | 4,000 | 2.4000 | 2.4500 | 2.2000 | at most 1,000 |" in text
    assert "shortest run (10 steps) already reaches the baseline on seed 0, 1: its need there is a bound" in text


def test_the_report_names_the_newton_schulz_dtypes_and_warns_a_claim_that_mixes_them():
    sweep = Sweep(name="n", base="ci", overrides={}, seeds=(0, 1), variants={"a": Variant("a", {}),
                                                                             "b": Variant("b", {})},
                  claims=(Claim("a beats b", "a", "b", metric="final/val_loss"),))
    runs = members(sweep)

    def report(dtype_of: dict[str, str | None], configs: dict) -> str:
        return build_report(sweep, runs, configs, {m.run_name: {**_result(2.0), "ns_dtype": dtype_of[m.variant]}
                                                   for m in runs})["text"]

    auto = {m.run_name: member_config(sweep, m) for m in runs}
    assert {c.optimizer.ns_dtype for c in auto.values()} == {"auto"}
    same = report({"a": "float32", "b": "float32"}, auto)
    assert "Newton-Schulz iterated in float32 (4 runs)." in same and "Caution" not in same
    mixed = report({"a": "bfloat16", "b": "float32"}, auto)  # ns_dtype=auto, the runs on two kinds of machine
    assert "Newton-Schulz iterated in bfloat16 (2 runs), float32 (2 runs)." in mixed
    assert "**Caution:** the runs compared here iterated Newton-Schulz in different dtypes (bfloat16, float32;" in mixed
    assert "Caution" not in report({"a": "bfloat16", "b": None}, auto)  # AdamW records none

    def pinned(a: str, b: str) -> dict:
        apart = Sweep(name="n", base="ci", overrides={}, seeds=(0, 1), claims=sweep.claims,
                      variants={"a": Variant("a", {"optimizer.ns_dtype": a}),
                                "b": Variant("b", {"optimizer.ns_dtype": b})})
        return {m.run_name: member_config(apart, m) for m in members(apart)}

    # A sweep that sets the dtypes apart on purpose compares them: no caution; one side left to auto: caution.
    assert "Caution" not in report({"a": "bfloat16", "b": "float32"}, pinned("bfloat16", "float32"))
    assert "Caution" in report({"a": "bfloat16", "b": "float32"}, pinned("auto", "float32"))

    # Only the runs the claim compares count: another dtype at a grid point that is not the best does not.
    grid = Sweep(name="g", base="ci", overrides={}, seeds=(0, 1), variants={"a": Variant("a", {}, {"train.lr": [1, 2]}),
                                                                            "b": Variant("b", {})},
                 claims=(Claim("a beats b", "a", "b", metric="final/val_loss"),))
    grid_runs = members(grid)
    results = {m.run_name: {**_result(2.0 if m.point.get("train.lr") == 2 else 3.0),
                            "ns_dtype": "bfloat16" if m.point.get("train.lr") == 1 else "float32"} for m in grid_runs}
    text = build_report(grid, grid_runs, {m.run_name: member_config(grid, m) for m in grid_runs}, results)["text"]
    assert "Newton-Schulz iterated in bfloat16 (2 runs), float32 (4 runs)." in text and "Caution" not in text
    # A gridded side with no best point yet (no seed has finished both its points) compares nothing.
    partial = {k: v for k, v in results.items() if k not in ("g-a-lr1-s0", "g-a-lr2-s1")}
    assert _compared(grid, grid_runs, partial, grid.claims[0]) == []
    assert [m.run_name for m in _compared(grid, grid_runs, results, grid.claims[0])] == [
        "g-a-lr2-s0", "g-a-lr2-s1", "g-b-s0", "g-b-s1"]


def test_sweep_files_are_checked_naming_the_field(tmp_path):
    def write(body: str):
        path = tmp_path / "s.yaml"
        path.write_text(textwrap.dedent(body))
        return str(path)

    with pytest.raises(ConfigError, match=r"s\.yaml: claims\[0\]: variant 'c' is not one of \['a', 'b'\]"):
        load_sweep(write("""
            name: s
            base: ci
            variants: {a: {train.lr: 0.001}, b: {train.lr: 0.003}}
            claims: [{claim: x, variant: c, baseline: a, metric: final/val_loss}]"""))
    with pytest.raises(ConfigError, match=r"run s-a-s0: unknown config key 'train\.lrr'"):
        load_sweep(write("""
            name: s
            base: ci
            variants: {a: {train.lrr: 0.001}}"""))
    with pytest.raises(ConfigError, match=r"seeds: \[0, 0\]: repeated seed"):
        load_sweep(write("""
            name: s
            seeds: [0, 0]
            variants: {a: {}}"""))
    with pytest.raises(ConfigError, match="tokens_to_match needs a grid over train.steps"):
        load_sweep(write("""
            name: s
            variants: {a: {}, b: {}}
            claims: [{claim: x, variant: a, baseline: b, metric: final/val_loss, kind: tokens_to_match}]"""))
    with pytest.raises(ConfigError, match=r"over train.steps \(and nothing else\) in variant 'a'"):
        load_sweep(write("""
            name: s
            variants: {a: {grid: {train.steps: [10, 20], train.lr: [0.001, 0.003]}}, b: {}}
            claims: [{claim: x, variant: a, baseline: b, metric: final/val_loss, kind: tokens_to_match}]"""))
    with pytest.raises(ConfigError, match="no such file, nor a bundled sweep; bundled: dense_layers, heads"):
        load_sweep("nope")


@pytest.mark.parametrize("name", ["optimizer", "qk_clip", "sparsity", "dense_layers", "heads"])
def test_the_bundled_sweeps_load_with_three_seeds_and_a_stated_run_time(name):
    sweep = load_sweep(name)
    assert len(sweep.seeds) >= 3 and sweep.hours and sweep.claims
    quick = members(sweep, quick=True)
    assert {m.seed for m in quick} == {sweep.seeds[0]} and all(m.overrides["train.steps"] <= 3 for m in quick)
    for m in quick:  # valid configs, as a --quick run checks before it starts
        assert member_config(sweep, m).train.steps <= 3
    assert len({m.run_name for m in members(sweep)}) == len(members(sweep))


SMOKE = """
name: smoke
about: two optimizers, one seed, a few steps (a wiring check)
base: ci
set: {train.steps: 4, train.log_every: 1, train.eval_every: 0, train.stats_every: 0}
seeds: [0]
variants:
  muonclip: {optimizer.name: muonclip}
  adamw: {optimizer.name: adamw}
claims:
  - claim: MuonClip reaches a lower validation loss than AdamW
    variant: muonclip
    baseline: adamw
    metric: final/val_loss
    better: lower
    details: [max_logit]
"""


@pytest.mark.slow
def test_a_smoke_sweep_runs_nests_its_runs_reports_and_resumes(tmp_path, monkeypatch):
    import ray

    from pipelines import tracking

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke.yaml").write_text(SMOKE)
    sweep = load_sweep(str(tmp_path / "smoke.yaml"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = {"storage.root": str(tmp_path / "k2runs"), "tracking.uri": uri}
    try:
        report = run_sweep(sweep, extra=extra, parallel=2)
        assert report["finished"] == 2 and not report["failures"] and not report["missing"]
        c = tracking.client(uri)
        exp = c.get_experiment_by_name("k2pipe")
        sweeps = c.search_runs([exp.experiment_id], "tags.`k2pipe.kind` = 'sweep'")
        assert [r.data.tags["k2pipe.sweep"] for r in sweeps] == ["smoke"]
        assert sweeps[0].info.status == "FINISHED"
        children = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{sweeps[0].info.run_id}'")
        variants = {r.data.tags["k2pipe.run_name"]: r for r in children}
        assert sorted(variants) == ["smoke-adamw-s0", "smoke-muonclip-s0"]
        for run in variants.values():
            assert "final/val_loss" in run.data.metrics and run.data.tags["k2pipe.kind"] == "pipeline"
            stages = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
            status = {r.data.tags["k2pipe.stage"]: r.info.status for r in stages}
            # The sweep runs each member up to evaluate: export has not run, and does not look as if it runs.
            assert status == {"ingest": "FINISHED", "tokenizer": "FINISHED", "shard": "FINISHED",
                              "pretrain": "FINISHED", "evaluate": "FINISHED", "export": "SCHEDULED"}
        text = (tmp_path / "k2runs" / "sweeps" / "smoke" / "report.md").read_text()
        for name, run in variants.items():
            assert f"| `{name}` |" in text and f"{run.data.metrics['final/val_loss']:.4f}" in text
        assert "**Verdict: not borne out at this scale (fewer than 2 seeds: no standard error)** " in text
        assert "Per-step max logit over tau" in text
        record = json.loads((tmp_path / "k2runs" / "sweeps" / "smoke" / "report.json").read_text())
        assert record["finished"] == 2 and record["claims"][0]["n"] == 1
        logged = {a.path for a in c.list_artifacts(sweeps[0].info.run_id, "report")}
        assert {"report/report.md", "report/claim1.png"} <= logged

        pretrain = c.search_runs([exp.experiment_id], "tags.`k2pipe.stage` = 'pretrain'")
        before = {r.info.run_id: [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")] for r in pretrain}
        again = run_sweep(sweep, extra=extra, parallel=2)  # finished: everything reused, nothing logged twice
        assert again["text"] == report["text"]
        after = {r.info.run_id: [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")] for r in pretrain}
        assert after == before and all(steps == [1, 2, 3, 4] for steps in after.values())

        # Carried to another tracking server through runs.json: the data stages are found, no run trains
        # again, and the report is the same.
        runs_json = tmp_path / "k2runs" / "sweeps" / "smoke" / "runs.json"
        kept = json.loads(runs_json.read_text())["runs"]
        ns = kept["smoke-muonclip-s0"]["ns_dtype"]  # what optimizer.ns_dtype=auto resolved to here
        assert ns in ("bfloat16", "float32") and kept["smoke-adamw-s0"]["ns_dtype"] is None
        assert f"Newton-Schulz iterated in {ns} (1 run)." in text
        saved = tmp_path / "saved-runs.json"  # a later report here writes runs.json again
        saved.write_bytes(runs_json.read_bytes())
        other_uri = f"sqlite:///{tmp_path / 'other.db'}"
        other = {"storage.root": str(tmp_path / "k2runs"), "tracking.uri": other_uri}
        moved = run_sweep(sweep, extra=other, parallel=2, reuse=[str(runs_json.parent)])
        assert moved["finished"] == 2 and json.dumps(moved["claims"]) == json.dumps(report["claims"])  # se: NaN
        for name in variants:
            row = next(line for line in report["text"].splitlines() if line.startswith(f"| `{name}` |"))
            assert row in moved["text"]
        assert f"Carried over from `{runs_json.parent}` (2 runs, not run again here)" in moved["text"]
        oc = tracking.client(other_uri)
        other_exp = oc.get_experiment_by_name("k2pipe")
        parents = oc.search_runs([other_exp.experiment_id], "tags.`k2pipe.kind` = 'pipeline'")
        assert parents and not any("final/val_loss" in r.data.metrics for r in parents)  # the data stages only
        assert json.loads(saved.read_text())["runs"]["smoke-adamw-s0"]["data_fingerprint"]
        # A run whose config has changed since is not carried over: it is reported as not finished.
        (tmp_path / "changed.yaml").write_text(SMOKE.replace("{optimizer.name: adamw}",
                                                             "{optimizer.name: adamw, train.lr: 0.002}"))
        changed = load_sweep(str(tmp_path / "changed.yaml"))
        partial = run_sweep(changed, extra=other, report_only=True, reuse=[str(saved)])
        assert partial["finished"] == 1 and partial["missing"] == ["smoke-adamw-s0"]
        assert "under another config or on other data, so not carried over: `smoke-adamw-s0`" in partial["text"]
        # A run that trained on other data (another shard fingerprint) goes through the pipeline again.
        doc = json.loads(saved.read_text())
        doc["runs"]["smoke-adamw-s0"]["data_fingerprint"] = "0" * 16
        (tmp_path / "otherdata.json").write_text(json.dumps(doc))
        redo = run_sweep(sweep, extra=other, parallel=2, reuse=[str(tmp_path / "otherdata.json")])
        assert redo["finished"] == 2 and "on other data, so not carried over: `smoke-adamw-s0`" in redo["text"]
        parents = oc.search_runs([other_exp.experiment_id], "tags.`k2pipe.kind` = 'pipeline'")
        assert [r.data.tags["k2pipe.run_name"] for r in parents if "final/val_loss" in r.data.metrics] == \
            ["smoke-adamw-s0"]
        with pytest.raises(ConfigError, match="no such file"):
            run_sweep(sweep, extra=other, report_only=True, reuse=[str(tmp_path / "nope.json")])
        (tmp_path / "wrong.json").write_text(json.dumps({"sweep": "other", "runs": {}}))
        with pytest.raises(ConfigError, match="wrong.json: holds runs of sweep 'other', not of 'smoke'"):
            run_sweep(sweep, extra=other, report_only=True, reuse=[str(tmp_path / "wrong.json")])
    finally:
        ray.shutdown()


def test_a_member_names_its_variant_grid_point_and_seed():
    sweep = Sweep(name="n", base="ci", overrides={"train.steps": 50}, seeds=(3,),
                  variants={"v": Variant("v", {"optimizer.name": "adamw"}, {"train.lr": [0.001]})}, claims=())
    assert members(sweep) == [Member("v", {"train.lr": 0.001}, 3, "n-v-lr0p001-s3",
                                     {"train.steps": 50, "optimizer.name": "adamw", "train.lr": 0.001,
                                      "train.seed": 3})]


def test_sweep_list_names_every_run_and_checks_the_overrides_first(capsys):
    from ray_jobs import cli

    assert cli.main(["sweep", "heads", "--list"]) == cli.EXIT_OK
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [m.run_name for m in members(load_sweep("heads"))]
    assert cli.main(["sweep", "heads", "--list", "--set", "train.foo=1"]) == cli.EXIT_USAGE
    assert "run heads-heads4-s0: unknown config key 'train.foo'" in capsys.readouterr().err
