"""``k2pipe sweep``: variants of one base config, each with several seeds, and a verdict on each claim.

A sweep file (YAML)::

    name: qk-clip                      # names the sweep's runs: <name>-<variant>[-<grid point>]-s<seed>
    about: what the sweep asks
    base: ci                           # a bundled run config or a YAML path
    set: {train.steps: 300}            # overrides for every run
    seeds: [0, 1, 2]                   # each run once per seed (train.seed)
    hours: 3.0                         # the full sweep's run time on a 2-core CPU, as measured
    variants:
      clip: {optimizer.qk_clip: true}  # overrides; or {set: {...}, grid: {key: [values], ...}}
      noclip: {optimizer.qk_clip: false}
    claims:
      - claim: QK-Clip lowers the worst max logit
        variant: clip                  # the side the claim favours
        baseline: noclip
        metric: final/max_logit        # a headline metric of the runs (pipelines.dag.HEADLINE_METRICS),
        better: lower                  #   or series: KEY with over_steps: N (mean of its first N steps)
        details: [max_logit]           # optional tables: max_logit (its distribution over tau), loss_rise
                                       #   (the windowed training loss's worst rise over its best so far)

The verdict rule is fixed: the claim's metric is paired by seed, d = baseline - variant (lower is better;
the other way round for higher), and the claim is **borne out** when the mean of d is more than 2 standard
errors above zero and every seed's d is positive; otherwise **not borne out at this scale**, with the
numbers. A variant with a grid takes its best grid point (best mean over seeds) for the comparison, and
the report says whether that point lies inside the grid or on its edge. ``kind: tokens_to_match``
compares the tokens a variant with a grid over ``train.steps`` needs (its smallest complete run whose final
metric reaches the baseline's) with the baseline's tokens, paired by seed the same way.

The data stages run once per distinct data config; then the runs go to the cluster together (``parallel``
at a time), each a pipeline run up to ``evaluate`` whose MLflow parent run is nested under the sweep's
parent run. A sweep resumes: finished runs are reused whole, unfinished ones resume from their checkpoints,
and the report is built from what has finished, saying what has not.

Every report also writes ``runs.json``: each finished run's numbers and series with a fingerprint of its
config. ``reuse`` takes such files from earlier reports (another storage root, another tracking server, an
earlier machine): a run found there whose fingerprint matches its config now, and whose data (the shard
stage's fingerprint, which covers the corpus's listing) matches this sweep's, is carried over as finished and
not run again; one whose config or data has changed since runs again, and the report says so.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage, tracking
from pipelines.config import ConfigError, RunConfig, load_config, read_yaml_file

SWEEP_DIR = Path(__file__).parent / "sweeps"
KINDS = ("paired", "tokens_to_match")
DETAILS = ("max_logit", "loss_rise")
RISE_WINDOW = 20  # steps a window of the training loss averages, for the loss_rise table
QUICK_STEPS = 3
RUNS_FILE = "runs.json"


# ---------------------------------------------------------------------- the sweep file
@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values (one empty point without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclass(frozen=True)
class Claim:
    claim: str
    variant: str
    baseline: str
    metric: str | None = None
    series: str | None = None
    over_steps: int | None = None
    better: str = "lower"
    kind: str = "paired"
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sweep:
    name: str
    base: str | None
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    variants: dict[str, Variant]
    claims: tuple[Claim, ...]
    about: str = ""
    hours: float | None = None
    source: str = ""


@dataclass(frozen=True)
class Member:
    """One run of the sweep: a variant at one grid point and one seed."""

    variant: str
    point: dict[str, Any]
    seed: int
    run_name: str
    overrides: dict[str, Any]


def _need(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def resolve_sweep_path(spec: str) -> Path:
    """A sweep file path, or the name of a bundled one (``pipelines/sweeps/<name>.yaml``)."""
    p = Path(spec)
    if p.exists():
        return p
    bundled = SWEEP_DIR / f"{spec}.yaml"
    if bundled.exists():
        return bundled
    known = sorted(f.stem for f in SWEEP_DIR.glob("*.yaml"))
    raise ConfigError(f"sweep {spec!r}: no such file, nor a bundled sweep; bundled: {', '.join(known)}")


def load_sweep(spec: str) -> Sweep:
    """Read and check a sweep file; every error names the file and the field."""
    path = resolve_sweep_path(spec)
    doc = read_yaml_file(path)
    _need(isinstance(doc, dict), str(path), "expected a mapping with name, base, seeds, variants, claims")
    known = {"name", "about", "base", "set", "seeds", "hours", "variants", "claims"}
    unknown = sorted(set(doc) - known)
    _need(not unknown, f"{path}: {unknown[0] if unknown else ''}", f"unknown field; valid: {sorted(known)}")
    name = doc.get("name")
    _need(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(), f"{path}: name",
          f"{name!r}: give letters, digits, - or _")
    seeds = doc.get("seeds", [0])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds), f"{path}: seeds",
          f"{seeds!r}: expected a list of integers")
    _need(len(set(seeds)) == len(seeds), f"{path}: seeds", f"{seeds!r}: repeated seed")
    overrides = doc.get("set") or {}
    _need(isinstance(overrides, dict), f"{path}: set", "expected a mapping of section.key: value")
    variants: dict[str, Variant] = {}
    raw_variants = doc.get("variants")
    _need(isinstance(raw_variants, dict) and len(raw_variants) >= 1, f"{path}: variants",
          "expected a mapping of variant name: overrides")
    for vname, body in raw_variants.items():
        where = f"{path}: variants.{vname}"
        _need(str(vname).replace("-", "").replace("_", "").isalnum(), where, "name: letters, digits, - or _")
        body = body or {}
        _need(isinstance(body, dict), where, "expected a mapping of section.key: value, or {set:, grid:}")
        if set(body) <= {"set", "grid"} and body:
            grid = body.get("grid") or {}
            _need(isinstance(grid, dict) and all(isinstance(v, list) and v for v in grid.values()), f"{where}.grid",
                  "expected a mapping of section.key: [values]")
            variants[str(vname)] = Variant(str(vname), dict(body.get("set") or {}),
                                           {k: list(v) for k, v in grid.items()})
        else:
            variants[str(vname)] = Variant(str(vname), dict(body))
    claims = []
    for i, raw in enumerate(doc.get("claims") or []):
        where = f"{path}: claims[{i}]"
        _need(isinstance(raw, dict), where, "expected a mapping")
        fields = {f.name for f in dataclasses.fields(Claim)}
        bad = sorted(set(raw) - fields)
        _need(not bad, f"{where}.{bad[0] if bad else ''}", f"unknown field; valid: {sorted(fields)}")
        try:
            claim = Claim(**{**raw, "details": tuple(raw.get("details") or ())})
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
        for side in (claim.variant, claim.baseline):
            _need(side in variants, where, f"variant {side!r} is not one of {sorted(variants)}")
        _need(claim.better in ("lower", "higher"), f"{where}.better", f"{claim.better!r}: lower or higher")
        _need(claim.kind in KINDS, f"{where}.kind", f"{claim.kind!r}: one of {KINDS}")
        _need((claim.metric is None) != (claim.series is None), where, "give metric (a headline metric) or series")
        _need(claim.series is None or (claim.over_steps or 0) >= 1, f"{where}.over_steps",
              "a series needs over_steps >= 1 (the mean over its first N steps)")
        _need(all(d in DETAILS for d in claim.details), f"{where}.details", f"valid: {DETAILS}")
        if claim.kind == "tokens_to_match":
            _need(list(variants[claim.variant].grid) == ["train.steps"], f"{where}.kind",
                  f"tokens_to_match needs a grid over train.steps (and nothing else) in variant {claim.variant!r}")
        claims.append(claim)
    sweep = Sweep(name=name, base=doc.get("base"), overrides=dict(overrides), seeds=tuple(seeds), variants=variants,
                  claims=tuple(claims), about=str(doc.get("about") or ""), hours=doc.get("hours"), source=str(path))
    for member in members(sweep):  # every run's config is valid before anything starts
        member_config(sweep, member)
    return sweep


def _suffix(point: dict[str, Any]) -> str:
    return "".join(f"-{k.rsplit('.', 1)[-1]}{v}" for k, v in point.items())


def members(sweep: Sweep, quick: bool = False) -> list[Member]:
    """Every run of the sweep. ``quick``: one seed, at most ``QUICK_STEPS`` steps a run with one warm-up step
    (a wiring check)."""
    seeds = sweep.seeds[:1] if quick else sweep.seeds
    out = []
    for variant in sweep.variants.values():
        for point in variant.points():
            for seed in seeds:
                overrides = {**sweep.overrides, **variant.overrides, **point, "train.seed": seed}
                if quick:
                    steps = int(overrides.get("train.steps", 0)) or QUICK_STEPS
                    overrides["train.steps"] = max(1, min(steps, QUICK_STEPS))
                    overrides["train.warmup_steps"] = 1
                name = f"{sweep.name}{'-quick' if quick else ''}-{variant.name}{_suffix(point)}-s{seed}"
                out.append(Member(variant.name, point, seed, name.replace(".", "p"), overrides))
    return out


def member_config(sweep: Sweep, member: Member, extra: dict[str, Any] | None = None) -> RunConfig:
    """The run config of one member (``extra``: command-line overrides, storage and tracking for instance)."""
    overrides = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in {**member.overrides, **(extra or {})}.items()}
    overrides.setdefault("train.checkpoint_every", "0")
    try:
        return load_config(sweep.base, overrides, run_name=member.run_name)
    except ConfigError as e:
        raise ConfigError(f"{sweep.source}: run {member.run_name}: {e}") from None


def config_fingerprint(cfg: RunConfig) -> str:
    """A short hash of what decides a run's numbers, to tell a carried-over run from a changed one: the
    values a checkpoint must agree with (``math_signature``: model, optimizer, schedule, batch, seed,
    steps), the data config and the evaluation's. Layout and operational settings are left out."""
    from pipelines.train.trainer import math_signature

    return storage.fingerprint({"math": math_signature(cfg), "data": dataclasses.asdict(cfg.data),
                                "evaluate": dataclasses.asdict(cfg.evaluate)})


def carry_over(sweep: Sweep, runs: list[Member], configs: dict[str, RunConfig], sources: list[str]
               ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The finished runs of earlier reports' ``runs.json`` files (``sources``) that this sweep can take as
    they are: same sweep, same run name, same config fingerprint. Returns them, and the runs found whose
    config has changed since (run name: the file), which are not carried over. ``run_sweep`` then checks
    the carried runs' data fingerprints once the data stages have run (a report-only call cannot)."""
    carried: dict[str, dict[str, Any]] = {}
    changed: dict[str, str] = {}
    wanted = {m.run_name for m in runs}
    for source in sources:
        uri = storage.normalize_uri(source)
        if storage.exists(uri) and not storage.is_file(uri):
            uri = storage.join(uri, RUNS_FILE)
        if not storage.exists(uri):
            raise ConfigError(f"--reuse {source}: no such file (give the {RUNS_FILE} of an earlier report of "
                              f"sweep {sweep.name}, or its folder)")
        doc = storage.read_json(uri)
        _need(isinstance(doc, dict) and isinstance(doc.get("runs"), dict), uri,
              f"not a sweep's {RUNS_FILE}: it needs a 'runs' mapping of run name to results")
        _need(doc.get("sweep") == sweep.name, uri,
              f"holds runs of sweep {doc.get('sweep')!r}, not of {sweep.name!r}")
        for name, result in doc["runs"].items():
            if name not in wanted or name in carried:
                continue
            _need(isinstance(result, dict) and isinstance(result.get("metrics"), dict), uri,
                  f"run {name}: needs 'metrics' (and 'series', 'tokens_per_step', 'tau')")
            if result.get("fingerprint") == config_fingerprint(configs[name]):
                carried[name] = {k: v for k, v in result.items() if k != "carried_from"} | {"carried_from": source}
                changed.pop(name, None)
            else:
                changed[name] = source
    return carried, changed


# ---------------------------------------------------------------------- running
def _sweep_tracking(sweep: Sweep, cfg: RunConfig, quick: bool) -> dict[str, Any] | None:
    """The sweep's parent run (created once, found again by its name), recorded beside the sweep's report."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking_uri(uri)
    c = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    name = sweep.name + ("-quick" if quick else "")
    found = tracking.retry(lambda: c.search_runs(
        [experiment_id], filter_string=f"tags.`k2pipe.kind` = 'sweep' and tags.`k2pipe.sweep` = '{name}'",
        max_results=1))
    if found:
        run_id = found[0].info.run_id
        tracking.retry(lambda: c.update_run(run_id, status="RUNNING"))
    else:
        note = (sweep.about or name) + (" (quick: a wiring check, not evidence)" if quick else "")
        run = tracking.retry(lambda: c.create_run(experiment_id, run_name=name, tags={
            "k2pipe.kind": "sweep", "k2pipe.sweep": name, tracking.RUN_NAME_TAG: name, "mlflow.note.content": note}))
        run_id = run.info.run_id
    return {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id, "name": name}


def run_sweep(sweep: Sweep, *, quick: bool = False, extra: dict[str, Any] | None = None,
              ray_address: str | None = None, parallel: int | None = None, report_only: bool = False,
              reuse: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) every member not carried over from ``reuse`` (earlier reports' ``runs.json``), then
    write the report; returns the report's record."""
    from pipelines.cluster import init_ray
    from pipelines.console import say
    from pipelines.dag import PipelineError, run_pipeline

    runs = members(sweep, quick)
    configs = {m.run_name: member_config(sweep, m, extra) for m in runs}
    first = next(iter(configs.values()))
    root = storage.normalize_uri(first.storage.root)
    carried, changed = carry_over(sweep, runs, configs, reuse or [])
    to_run = {name: cfg for name, cfg in configs.items() if name not in carried}
    record = _sweep_tracking(sweep, first, quick)
    failures: dict[str, str] = {}
    if carried:
        say(f"[k2pipe] sweep {sweep.name}: {len(carried)} finished runs carried over, not run again")
    for name, source in changed.items():
        say(f"[k2pipe] sweep {sweep.name}: {name} in {source} ran another config: not carried over")
    if not report_only and (to_run or carried):
        init_ray(first, ray_address)
        # The data stages once per distinct data config, one after another (two runs building the same
        # stage folder at once would race); the runs then find them complete.
        # A carried-over run counts only if its data is this sweep's (the shard stage's fingerprint covers
        # the corpus's listing as well as the data config), so its data stages run (or are found) too.
        data_fp: dict[str, str | None] = {}
        for cfg in configs.values():
            key = storage.canonical_json(dataclasses.asdict(cfg.data))
            if key not in data_fp:
                done = run_pipeline(cfg, until="shard", ray_address=ray_address,
                                    nest_under=record["run_id"] if record else None)
                data_fp[key] = done.stages["shard"].fingerprint
        for name in list(carried):
            key = storage.canonical_json(dataclasses.asdict(configs[name].data))
            if carried[name].get("data_fingerprint") not in (None, data_fp[key]):
                changed[name] = carried.pop(name)["carried_from"]
                say(f"[k2pipe] sweep {sweep.name}: {name} in {changed[name]} trained on other data: runs again")
                to_run[name] = configs[name]
        if parallel is None:
            import ray

            per_run = max(first.train.num_workers * first.train.cpus_per_worker, 0.5)
            parallel = max(1, int(ray.cluster_resources().get("CPU", 1) // per_run))
        say(f"[k2pipe] sweep {sweep.name}: {len(to_run)} runs, {min(parallel, len(to_run))} at a time")

        def one(cfg: RunConfig) -> None:
            run_pipeline(cfg, until="evaluate", ray_address=ray_address,
                         nest_under=record["run_id"] if record else None)

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            futures = {pool.submit(one, cfg): name for name, cfg in to_run.items()}
            for future in concurrent.futures.as_completed(futures):
                try:
                    future.result()
                except PipelineError as e:
                    failures[futures[future]] = str(e)
                    say(f"[k2pipe] sweep {sweep.name}: run {futures[future]} failed: {e}")
    results = {**carried, **collect(sweep, runs, configs, record)}  # a run tracked here wins over a carried one
    report = build_report(sweep, runs, configs, results, quick=quick, failures=failures, changed=changed)
    out = storage.join(root, "sweeps", sweep.name + ("-quick" if quick else ""))
    for name, data in report["files"].items():
        storage.write_bytes(storage.join(out, name), data)
    if record is not None:
        from pipelines.artifacts import _log_bytes

        c = tracking.client(record["tracking_uri"])
        for name, data in report["files"].items():
            _log_bytes(c, record["run_id"], data, f"report/{name}")
        status = "FINISHED" if report["finished"] == len(runs) else "RUNNING"
        tracking.retry(lambda: c.set_terminated(record["run_id"], status=status) if status == "FINISHED"
                       else c.update_run(record["run_id"], status=status))
    return {**report, "uri": out, "failures": failures}


# ---------------------------------------------------------------------- results
def collect(sweep: Sweep, runs: list[Member], configs: dict[str, RunConfig], record: dict[str, Any] | None
            ) -> dict[str, dict[str, Any]]:
    """What each finished member measured, read back from MLflow (so a report can be built at any later
    time from what has finished): the parent's headline metrics and the pretrain run's series the claims
    need. A member is finished when its parent run has ``final/val_loss``."""
    if record is None:
        return {}
    c = tracking.client(record["tracking_uri"])
    series_keys = {cl.series for cl in sweep.claims if cl.series} | {"attn/max_logit", "train/loss"}
    out: dict[str, dict[str, Any]] = {}
    for m in runs:
        parents = tracking.retry(lambda m=m: c.search_runs(
            [record["experiment_id"]], filter_string=f"tags.`k2pipe.kind` = 'pipeline' and "
                                                     f"tags.`{tracking.RUN_NAME_TAG}` = '{m.run_name}'", max_results=1))
        if not parents or "final/val_loss" not in parents[0].data.metrics:
            continue
        parent = parents[0]
        stages = tracking.retry(lambda parent=parent: c.search_runs(
            [record["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                                     f"tags.`{tracking.STAGE_TAG}` = 'pretrain'", max_results=1))
        series, ns_dtype = {}, None
        if stages:
            ns_dtype = stages[0].data.tags.get("k2pipe.ns_dtype")  # as optimizer.ns_dtype resolved (MuonClip)
            pretrain_id = stages[0].info.run_id
            for key in sorted(series_keys):  # a stable runs.json
                points = tracking.retry(lambda key=key, pretrain_id=pretrain_id: c.get_metric_history(pretrain_id, key))
                series[key] = sorted((p.step, p.value) for p in points)
        cfg = configs[m.run_name]
        out[m.run_name] = {"metrics": dict(parent.data.metrics), "series": series,
                           "data_fingerprint": parent.data.tags.get("shard.fingerprint"), "ns_dtype": ns_dtype,
                           "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
                           "tau": cfg.optimizer.qk_clip_tau}
    return out


def verdict(diffs: list[float]) -> dict[str, Any]:
    """The fixed rule over per-seed differences (positive: the claim's side did better)."""
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    se = statistics.stdev(diffs) / math.sqrt(n) if n >= 2 else float("nan")
    borne = n >= 2 and mean > 2 * se and all(d > 0 for d in diffs)
    opposite = n >= 2 and mean < -2 * se and all(d < 0 for d in diffs)
    text = ("borne out" if borne else "not borne out at this scale"
            + (" (the opposite holds by the same rule)" if opposite else "")
            + ("" if n >= 2 else " (fewer than 2 seeds: no standard error)"))
    return {"n": n, "mean": mean, "se": se, "diffs": diffs, "borne_out": borne, "verdict": text}


def _value(result: dict[str, Any], claim: Claim) -> float | None:
    if claim.metric is not None:
        return result["metrics"].get(claim.metric)
    points = [v for s, v in result["series"].get(claim.series, []) if s <= claim.over_steps]
    return sum(points) / len(points) if points else None


def _best_point(sweep: Sweep, runs: list[Member], results: dict[str, dict[str, Any]], variant: str, claim: Claim,
                seeds: list[int]) -> tuple[dict[str, Any], dict[int, float], dict[str, str]]:
    """The grid point of ``variant`` with the best mean over ``seeds`` (its per-seed values) and, per grid key,
    whether that point lies inside the grid or on its edge."""
    sign = 1.0 if claim.better == "lower" else -1.0
    best: tuple[float, dict[str, Any], dict[int, float]] | None = None
    points = sweep.variants[variant].points()
    # The seeds every grid point has finished, so the points compare over the same seeds.
    seeds = [s for s in seeds if all(any(m.variant == variant and m.point == p and m.seed == s
                                         and m.run_name in results for m in runs) for p in points)]
    if not seeds:
        return {}, {}, {}
    for point in points:
        values = {m.seed: _value(results[m.run_name], claim) for m in runs
                  if m.variant == variant and m.point == point and m.run_name in results}
        values = {s: v for s, v in values.items() if v is not None and s in seeds}
        if len(values) < len(seeds):
            continue
        score = sign * sum(values.values()) / len(values)
        if best is None or score < best[0]:
            best = (score, point, values)
    if best is None:
        return {}, {}, {}
    grid = sweep.variants[variant].grid
    where = {k: ("inside" if 0 < grid[k].index(best[1][k]) < len(grid[k]) - 1 else "on the edge")
             for k in grid if len(grid[k]) > 1}
    return best[1], best[2], where


def _tokens_to_match(runs, results, claim, seeds, baseline_final: dict[int, float]) -> dict[int, float | None]:
    """Per seed, the tokens of the variant's smallest complete run whose final metric reaches the
    baseline's final metric (None: none does)."""
    out: dict[int, float | None] = {}
    sign = 1.0 if claim.better == "lower" else -1.0
    for seed in seeds:
        reached = []
        for m in runs:
            if m.variant == claim.variant and m.seed == seed and m.run_name in results:
                v = _value(results[m.run_name], claim)
                if v is not None and sign * v <= sign * baseline_final[seed]:
                    reached.append(results[m.run_name]["metrics"].get("final/tokens_trained"))
        out[seed] = min(reached) if reached else None
    return out


def loss_rise(series: list[tuple[int, float]], window: int = RISE_WINDOW) -> dict[str, Any] | None:
    """The training loss averaged over consecutive windows of ``window`` logged points: the best window,
    the last, and the worst rise of a window above the best one before it (0 when it never rose), with the
    last step of that window; and the worst spike, one point's excess over the median of the ``window``
    points before it, with its step. None when there are fewer than two windows."""
    means = [(series[i + window - 1][0], statistics.fmean(v for _, v in series[i:i + window]))
             for i in range(0, len(series) - window + 1, window)]
    if len(means) < 2:
        return None
    rise, at_step, best = 0.0, None, means[0][1]
    for step, value in means[1:]:
        if value - best > rise:
            rise, at_step = value - best, step
        best = min(best, value)
    spike, spike_step = 0.0, None
    for i in range(window, len(series)):
        excess = series[i][1] - statistics.median(v for _, v in series[i - window:i])
        if excess > spike:
            spike, spike_step = excess, series[i][0]
    return {"best": min(v for _, v in means), "last": means[-1][1], "rise": rise, "at_step": at_step,
            "spike": spike, "spike_step": spike_step}


def build_report(sweep: Sweep, runs: list[Member], configs: dict[str, RunConfig], results: dict[str, dict[str, Any]],
                 *, quick: bool = False, failures: dict[str, str] | None = None,
                 changed: dict[str, str] | None = None) -> dict[str, Any]:
    """The Markdown report (every seed's numbers, a verdict per claim) with its plots, from what finished;
    and ``runs.json``, every finished run's results with its config's fingerprint (``carry_over``)."""
    lines = [f"# Sweep `{sweep.name}`" + (" (quick)" if quick else ""), ""]
    if quick:
        lines += ["**A wiring check, not evidence:** one seed and at most "
                  f"{QUICK_STEPS} steps a run.", ""]
    if sweep.about:
        lines += [sweep.about, ""]
    lines += [f"Base `{sweep.base}`, seeds {sorted({m.seed for m in runs})}, {len(runs)} runs; {len(results)} finished."
              + (f" The full sweep takes about {sweep.hours:g} h on 2 CPU cores." if sweep.hours else ""), ""]
    missing = [m.run_name for m in runs if m.run_name not in results]
    carried = sorted({r["carried_from"] for r in results.values() if r.get("carried_from")})
    for source in carried:
        names = [m.run_name for m in runs if results.get(m.run_name, {}).get("carried_from") == source]
        lines += [f"Carried over from `{source}` ({len(names)} runs, not run again here): "
                  + ", ".join(f"`{n}`" for n in names), ""]
    if changed:
        lines += ["In an earlier report, but under another config or on other data, so not carried over: "
                  + ", ".join(f"`{n}`" for n in changed), ""]
    if missing:
        lines += [f"Not finished ({len(missing)}): " + ", ".join(f"`{n}`" for n in missing), ""]
    for name, why in (failures or {}).items():
        lines += [f"- `{name}` failed: {why}"]
    lines += ["## Runs", "", "| run | variant | seed | final train loss | final val loss | worst max logit | tokens |",
              "|---|---|---|---|---|---|---|"]
    for m in runs:
        r = results.get(m.run_name)
        if r is None:
            continue
        mm = r["metrics"]
        lines.append(f"| `{m.run_name}` | {m.variant}{_suffix(m.point)} | {m.seed} | "
                     f"{mm.get('final/train_loss', float('nan')):.4f} | {mm.get('final/val_loss', float('nan')):.4f} | "
                     f"{mm.get('final/max_logit', float('nan')):.2f} | {mm.get('final/tokens_trained', 0):,.0f} |")
    # optimizer.ns_dtype=auto resolves per machine (bf16 where it multiplies bf16 natively), and a config
    # fingerprint cannot see that: say what the runs resolved, and warn a claim that compares across it.
    by_dtype: dict[str, int] = {}
    for r in results.values():
        if r.get("ns_dtype"):
            by_dtype[r["ns_dtype"]] = by_dtype.get(r["ns_dtype"], 0) + 1
    if by_dtype:
        lines += ["", "Newton-Schulz iterated in " + ", ".join(f"{d} ({n} run{'' if n == 1 else 's'})"
                                                           for d, n in sorted(by_dtype.items())) + "."]
    lines.append("")
    files: dict[str, bytes] = {}
    verdicts = []
    for i, claim in enumerate(sweep.claims, 1):
        what = claim.metric or f"mean of {claim.series} over its first {claim.over_steps} steps"
        lines += [f"## Claim {i}: {claim.claim}", "",
                  f"`{claim.variant}` against `{claim.baseline}` on {what} ({claim.better} is better).", ""]
        seeds = [s for s in sweep.seeds if any(m.seed == s for m in runs)]
        if claim.kind == "tokens_to_match":
            base_point, base_vals, base_where = _best_point(sweep, runs, results, claim.baseline, claim, seeds)
            seeds_ok = [s for s in seeds if s in base_vals]
            base_tokens = {}
            for m in runs:
                if m.variant == claim.baseline and m.point == base_point and m.run_name in results:
                    base_tokens[m.seed] = results[m.run_name]["metrics"].get("final/tokens_trained")
            needed = _tokens_to_match(runs, results, claim, seeds_ok, base_vals)
            diffs = [base_tokens[s] - needed[s] if needed[s] is not None else -base_tokens[s] for s in seeds_ok]
            v = verdict(diffs) if seeds_ok else verdict([])
            # Every shorter run's final metric (a column per grid point), so a reader sees how close the
            # others came; a need met by the grid's shortest run is only a bound (a shorter one might too).
            steps = sorted(sweep.variants[claim.variant].grid["train.steps"])
            sign = 1.0 if claim.better == "lower" else -1.0
            short = {(m.seed, m.point["train.steps"]): _value(results[m.run_name], claim) for m in runs
                     if m.variant == claim.variant and m.run_name in results}
            bound = {s for s in seeds_ok if needed[s] is not None and short.get((s, steps[0])) is not None
                     and sign * short[(s, steps[0])] <= sign * base_vals[s]}
            need = {s: "not reached" if needed[s] is None else ("at most " if s in bound else "") + f"{needed[s]:,.0f}"
                     for s in seeds_ok}
            lines += ["| seed | baseline final | baseline tokens | "
                      + "".join(f"variant at {n} steps | " for n in steps) + "tokens the variant needs |",
                      "|---|---|---|" + "---|" * len(steps) + "---|"]
            lines += [f"| {s} | {base_vals[s]:.4f} | {base_tokens[s]:,.0f} | "
                      + "".join("- | " if short.get((s, n)) is None else f"{short[(s, n)]:.4f} | " for n in steps)
                      + f"{need[s]} |" for s in seeds_ok]
            if bound:
                lines.append(f"\nThe variant's shortest run ({steps[0]} steps) already reaches the baseline on seed "
                             + ", ".join(map(str, sorted(bound))) + ": its need there is a bound; a grid with "
                             "shorter runs would give the number.")
            if base_where:
                lines.append(f"\nBaseline at its best grid point {base_point} ({base_where}).")
        else:
            var_point, var_vals, var_where = _best_point(sweep, runs, results, claim.variant, claim, seeds)
            base_point, base_vals, base_where = _best_point(sweep, runs, results, claim.baseline, claim, seeds)
            paired = [s for s in seeds if s in var_vals and s in base_vals]
            sign = 1.0 if claim.better == "lower" else -1.0
            diffs = [sign * (base_vals[s] - var_vals[s]) for s in paired]
            v = verdict(diffs)
            lines += [f"| seed | {claim.variant} | {claim.baseline} | difference |", "|---|---|---|---|"]
            lines += [f"| {s} | {var_vals[s]:.4f} | {base_vals[s]:.4f} | {d:+.4f} |" for s, d in zip(paired, diffs)]
            for side, point, where in ((claim.variant, var_point, var_where), (claim.baseline, base_point, base_where)):
                if point:
                    lines.append(f"\n`{side}` at its best grid point {point}: "
                                 + ", ".join(f"{k} {w}" for k, w in where.items()) + ".")
            if "max_logit" in claim.details:
                lines += ["", "Per-step max logit over tau (median, p95, worst) and steps above tau:", "",
                          "| run | median | p95 | worst | steps above tau |", "|---|---|---|---|---|"]
                for m in runs:
                    r = results.get(m.run_name)
                    if r is None or m.variant not in (claim.variant, claim.baseline):
                        continue
                    ratios = sorted(val / r["tau"] for _, val in r["series"].get("attn/max_logit", []))
                    if ratios:
                        p95 = ratios[min(len(ratios) - 1, int(math.ceil(0.95 * len(ratios))) - 1)]
                        above = sum(x > 1 for x in ratios)
                        lines.append(f"| `{m.run_name}` | {statistics.median(ratios):.3f} | {p95:.3f} | "
                                     f"{ratios[-1]:.3f} | {above} of {len(ratios)} |")
            if "loss_rise" in claim.details:
                lines += ["", f"Training loss in windows of {RISE_WINDOW} logged steps: the best window, the last, "
                              "the worst rise of a window over the best before it (a divergence shows as a "
                              f"rise), and the worst spike, one step over the median of the {RISE_WINDOW} "
                              "before it (the first steps have none before them):", "",
                          "| run | best | last | worst rise | at step | worst spike | at step |",
                          "|---|---|---|---|---|---|---|"]
                for m in runs:
                    r = results.get(m.run_name)
                    if r is None or m.variant not in (claim.variant, claim.baseline):
                        continue
                    rise = loss_rise(r["series"].get("train/loss", []))
                    if rise:
                        lines.append(f"| `{m.run_name}` | {rise['best']:.3f} | {rise['last']:.3f} | "
                                     f"{rise['rise']:+.3f} | {rise['at_step'] or '-'} | "
                                     f"{rise['spike']:+.3f} | {rise['spike_step'] or '-'} |")
        compared = _compared(sweep, runs, results, claim)
        dtypes = sorted({results[m.run_name].get("ns_dtype") for m in compared} - {None})
        # Not when every compared run pins its dtype: the sweep then sets the dtypes apart on purpose.
        pinned = all(m.run_name in configs and configs[m.run_name].optimizer.ns_dtype != "auto" for m in compared)
        if len(dtypes) > 1 and not pinned:
            lines += ["", f"**Caution:** the runs compared here iterated Newton-Schulz in different dtypes "
                          f"({', '.join(dtypes)}; `optimizer.ns_dtype=auto` resolved on different machines): "
                          "part of a difference may be the dtype's. Pin `optimizer.ns_dtype` to compare like "
                          "with like."]
        lines += ["", f"**Verdict: {v['verdict']}** (mean difference {v['mean']:+.4g}, standard error "
                      f"{v['se']:.3g}, {v['n']} seed{'' if v['n'] == 1 else 's'}).", ""]
        verdicts.append({"claim": claim.claim, **v})
        plot = _claim_plot(sweep, runs, results, claim)
        if plot:
            files[f"claim{i}.png"] = plot
            lines += [f"![claim {i}](claim{i}.png)", ""]
    text = "\n".join(lines)
    files["report.md"] = text.encode()
    files["report.json"] = json.dumps({"sweep": sweep.name, "quick": quick, "finished": len(results),
                                       "runs": len(runs), "missing": missing, "claims": verdicts},
                                      indent=2, default=str).encode()
    files[RUNS_FILE] = json.dumps({"sweep": sweep.name, "quick": quick, "runs": {
        m.run_name: {**results[m.run_name],
                     "fingerprint": config_fingerprint(configs[m.run_name]) if m.run_name in configs else None}
        for m in runs if m.run_name in results}}, separators=(",", ":"), default=str).encode()
    return {"text": text, "files": files, "finished": len(results), "claims": verdicts, "missing": missing}


def _compared(sweep: Sweep, runs: list[Member], results: dict[str, dict[str, Any]], claim: Claim) -> list[Member]:
    """The finished runs a claim's differences come from: each side at its best grid point (the whole grid
    over steps of a tokens_to_match variant, which the claim reads whole), on the seeds it pairs; none of a
    side that has no best point yet (no seed has finished all its grid points)."""
    seeds = [s for s in sweep.seeds if any(m.seed == s for m in runs)]
    base_point, base_vals, _ = _best_point(sweep, runs, results, claim.baseline, claim, seeds)
    if claim.kind == "tokens_to_match":
        return [m for m in runs if m.run_name in results and m.seed in base_vals and (
            m.variant == claim.variant or (m.variant == claim.baseline and m.point == base_point))]
    var_point, var_vals, _ = _best_point(sweep, runs, results, claim.variant, claim, seeds)
    paired = set(var_vals) & set(base_vals)
    best = {claim.variant: var_point, claim.baseline: base_point}
    return [m for m in runs if m.run_name in results and m.seed in paired and m.variant in best
            and m.point == best[m.variant]]


def _plotted(sweep: Sweep, runs: list[Member], results: dict[str, dict[str, Any]], claim: Claim) -> list[Member]:
    """The runs a claim's plot draws: those it compares (``_compared``) that logged the series to draw."""
    key = claim.series or "train/loss"
    return [m for m in _compared(sweep, runs, results, claim) if results[m.run_name]["series"].get(key)]


def _claim_plot(sweep: Sweep, runs: list[Member], results: dict[str, dict[str, Any]], claim: Claim) -> bytes | None:
    """One line a run of the claim's two variants (``_plotted``), as PNG: the series a series claim averages,
    its window shaded; else the training loss."""
    import io
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = claim.series or "train/loss"
    chosen = _plotted(sweep, runs, results, claim)
    if not chosen:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {claim.variant: "tab:blue", claim.baseline: "tab:orange"}
    for m in chosen:
        steps, values = zip(*results[m.run_name]["series"][key])
        ax.plot(steps, values, color=colors[m.variant], alpha=0.7, label=f"{m.variant}{_suffix(m.point)} s{m.seed}")
    if claim.series:
        ax.axvspan(0, claim.over_steps, color="0.85", zorder=0, label=f"the claim's first {claim.over_steps} steps")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(textwrap.fill(claim.claim, 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()

