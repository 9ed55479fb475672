"""Pretraining on Ray Train: exact resume after a killed worker or a killed job, S3 checkpoints, partial
checkpoints ignored, storage outages survived, and what each rank reads back."""

from __future__ import annotations

import pytest
import ray
import torch

from benchmarks.common import SYNTHETIC_SEQ, SYNTHETIC_VOCAB, flat_tensors, synthetic_shards
from pipelines import storage
from pipelines.config import load_config
from pipelines.stages.pretrain import run_pretrain, validate_against_data
from pipelines.train import checkpoint_file, checkpointing

SEQ = SYNTHETIC_SEQ
VOCAB = SYNTHETIC_VOCAB


def write_shards(root: str, num_shards: int = 2, rows: int = 48) -> dict:
    """Synthetic packed shards with learnable structure, in the manifest layout of the shard stage."""
    return synthetic_shards(root, num_shards, rows)


def make_config(store: str, *extra: str, workers: int = 1, ep: int = 1, name: str = "t"):
    """Newton-Schulz in fp32 whatever the CPU kind (``optimizer.ns_dtype=auto`` picks bf16 where the CPU
    multiplies it natively): the resharded resume is held to fp32 rounding. ``auto`` itself is tested on
    the trainer (tests/pipelines/train/test_trainer.py) and in bf16 by tests/pipelines/train/test_reshard.py."""
    return load_config(None, ["optimizer.ns_dtype=float32",
        f"storage.root={store}", f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}", f"data.seq_len={SEQ}",
        "model.max_seq_len=64", f"train.num_workers={workers}", f"train.ep={ep}", "train.steps=8",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.checkpoint_every=4", "train.log_every=2",
        "train.eval_every=4", "train.warmup_steps=2", "train.cpus_per_worker=0.5", "train.max_failures=1",
        "tracking.enabled=false", *extra], run_name=name)


def final_shards(checkpoint_uri: str, world: int) -> list[dict]:
    names = [checkpointing.SHARD_NAME.format(rank=r) for r in range(world)]
    return [checkpoint_file.decode(storage.read_bytes(storage.join(checkpoint_uri, name))) for name in names]


def assert_same_training_state(a: list[dict], b: list[dict]) -> None:
    for sa, sb in zip(a, b):
        assert sa["step"] == sb["step"]
        for name, tensor in sa["model"].items():
            assert torch.equal(tensor, sb["model"][name]), name
        flat_a, flat_b = flat_tensors(sa["optimizer"]), flat_tensors(sb["optimizer"])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), key


@pytest.fixture(scope="module")
def ray_local():
    import os

    # Ray Train's controller collects reported checkpoints when it polls the workers (every 2 s by
    # default); a job killed sooner after a report loses that registration. Poll often, so that the
    # tests that kill a job resume from a recent checkpoint. Workers inherit the driver's environment.
    previous = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = previous


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    return root, write_shards(root)


@pytest.fixture(scope="module")
def reference_ep2(ray_local, data, tmp_path_factory):
    """An uninterrupted 2-worker expert-parallel run."""
    root, manifest = data
    cfg = make_config(str(tmp_path_factory.mktemp("ref")), workers=2, ep=2)
    out = run_pretrain(cfg, root, manifest)
    return out, final_shards(out.checkpoint_uri, 2)


def test_uninterrupted_run_trains_and_keeps_replicas_identical(reference_ep2):
    out, shards = reference_ep2
    assert out.step == 8
    # Replicated parameters are identical on both ranks; each rank holds half of every expert stack.
    for name, tensor in shards[0]["model"].items():
        if ".mlp.experts." in name:
            assert tensor.shape[0] == 8 and not torch.equal(tensor, shards[1]["model"][name])
        else:
            assert torch.equal(tensor, shards[1]["model"][name]), name
    assert out.metrics["train/loss"] < 5.3  # ln(256) = 5.55 at init


def test_killed_worker_resumes_exactly(reference_ep2, data, tmp_path):
    root, manifest = data
    cfg = make_config(str(tmp_path), "train.fault_injection=1:6", workers=2, ep=2)
    out = run_pretrain(cfg, root, manifest)
    assert storage.exists(storage.join(out.run_dir, "fault-injected-rank1-step6")), "the fault never fired"
    assert_same_training_state(final_shards(out.checkpoint_uri, 2), reference_ep2[1])


def test_a_registration_settles_once_the_controller_has_taken_it(ray_local, tmp_path):
    """``RayTrainRegistry.settle`` reads Ray Train's internal result queue (the preemption checkpoint waits on
    it): on this Ray it finds the queue and sees it emptied, and ``max_settle_s`` is the controller's poll
    period. (That the controller then holds the checkpoint is Ray's doing; the result's checkpoint only
    confirms the report went through, as it would once the worker returned anyway.)"""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path / "settle.json"

    def loop(config):
        import time

        import pyarrow.fs as pafs

        from pipelines.train.worker import RayTrainRegistry

        fs = pafs.LocalFileSystem()
        folder = f"{ray.train.get_context().get_storage().experiment_fs_path}/checkpoint-one"
        fs.create_dir(folder)
        with fs.open_output_stream(f"{folder}/meta.json") as f:
            f.write(b"{}")
        registry = RayTrainRegistry(fs)
        registry.register(folder, {"step": 1})
        t0 = time.monotonic()
        settled = registry.settle(30.0)
        took = time.monotonic() - t0
        time.sleep(1.0)  # stay past the settle: a finished worker's queue is drained anyway
        with open(config["out"], "w") as f:
            json.dump({"settled": settled, "took": took, "max_settle_s": registry.max_settle_s}, f)

    result = TorchTrainer(loop, train_loop_config={"out": str(out)},
                          scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                          run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="settle")).fit()
    seen = json.loads(out.read_text())
    assert seen["settled"] is True, "settle could not read Ray Train's result queue"
    assert seen["took"] < 30.0
    assert seen["max_settle_s"] == 0.2, "the controller's poll period, as ray_local sets it"
    assert result.checkpoint is not None and result.checkpoint.path.endswith("checkpoint-one")


def test_killed_job_resumes_from_latest_checkpoint_under_the_same_name(ray_local, data, tmp_path):
    root, manifest = data
    reference = run_pretrain(make_config(str(tmp_path / "ref")), root, manifest)
    # The crash comes 3 steps after the checkpoint of step 4, time for its upload to land and for Ray Train's
    # controller to register it (it collects reports when it polls the workers; see ray_local). Steps are
    # floored at 0.5 s: on a fast CPU, 3 tiny steps ended before the registration and the run retrained.
    crashing = make_config(str(tmp_path / "run"), "train.fault_injection=0:7", "train.max_failures=0",
                           "train.min_step_s=0.5")
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):
        run_pretrain(crashing, root, manifest)
    run_folder = storage.join(storage.run_dir(crashing.storage.root, "t"))
    assert any("checkpoint-step00000004" in p for p in storage.list_files(run_folder))
    # Same run name and config (the fault fired once already): Ray Train finds the run and resumes.
    resumed = run_pretrain(crashing, root, manifest)
    final = final_shards(resumed.checkpoint_uri, 1)
    assert_same_training_state(final, final_shards(reference.checkpoint_uri, 1))
    assert final[0]["run_history"] == [{"from_step": 0, "world_size": 1, "ep": 1, "pp": 1},
                                       {"from_step": 4, "world_size": 1, "ep": 1, "pp": 1}], "resumed, not retrained"


def test_non_finite_steps_are_skipped_then_the_latest_checkpoint_restored(ray_local, data, tmp_path):
    root, manifest = data
    reference = run_pretrain(make_config(str(tmp_path / "ref")), root, manifest)
    # Steps 5-7 produce a NaN loss on rank 0: skipped on every rank; after 3 in a row the run restores the
    # checkpoint of step 4 and replays 5-7 cleanly, ending exactly where an undisturbed run ends.
    cfg = make_config(str(tmp_path / "nan"), "train.nan_injection=0:5:3", "train.max_bad_steps=3")
    out = run_pretrain(cfg, root, manifest)
    assert_same_training_state(final_shards(out.checkpoint_uri, 1), final_shards(reference.checkpoint_uri, 1))
    assert final_shards(out.checkpoint_uri, 1)[0]["skipped_total"] == 3
    # Diverging again after the restore stops the run with an error that names the step.
    again = make_config(str(tmp_path / "nan2"), "train.nan_injection=0:5:6", "train.max_bad_steps=3",
                        "train.max_failures=0", "train.steps=12")
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError, match="diverged again at step 10"):
        run_pretrain(again, root, manifest)


def test_checkpoints_through_s3_survive_an_outage(ray_local, data, tmp_path, monkeypatch):
    """Checkpoints go to an S3 server on 127.0.0.1 that is stopped for a few seconds while the first
    checkpoint uploads: training goes on, the upload retries, and later checkpoints land."""
    import threading
    import time

    import boto3
    from moto.server import ThreadedMotoServer

    root, manifest = data
    first = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    first.start()
    host, port = first.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
    servers = [first]
    outage_seen = threading.Event()

    def outage():
        fs, path = storage.resolve("s3://outage/k2")
        deadline = time.time() + 180
        while time.time() < deadline and not any("fault" in p or "checkpoint-step00000002/" in p
                                                  for p in _list(fs, path)):
            time.sleep(0.05)
        servers[0].stop()
        outage_seen.set()
        time.sleep(4)
        again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        again.start()
        servers[0] = again

    # Ray workers inherit the driver's environment through the runtime env of this module's Ray instance
    # only for new processes; pass the endpoint explicitly.
    ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in __import__("os").environ.items() if k.startswith("AWS_")}})
    try:
        cfg = make_config("s3://outage/k2", "train.steps=12", "train.checkpoint_every=2", "train.keep_checkpoints=2")
        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        out = run_pretrain(cfg, root, manifest)
        thread.join(timeout=30)
        assert outage_seen.is_set()
        files = storage.list_files(out.run_dir)
        kept = sorted({p.split("checkpoint-step")[1][:8] for p in files if "checkpoint-step" in p})
        assert kept[-1] == "00000012" and len(kept) <= 3, kept
        assert storage.exists(storage.join(out.checkpoint_uri, "meta.json"))
        assert out.checkpoint_uri.startswith("s3://outage/")
    finally:
        servers[0].stop()


def _list(fs, path):
    import pyarrow.fs as pafs

    try:
        return [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    except OSError:
        return []


def test_rank_reads_only_meta_and_its_own_shard(reference_ep2):
    out, _ = reference_ep2
    fs, path = storage.resolve(out.checkpoint_uri)
    opened: list[str] = []

    class RecordingFS:
        def __getattr__(self, name):
            attr = getattr(fs, name)
            if name.startswith("open_input"):
                def wrapper(p, *a, **k):
                    opened.append(p)
                    return attr(p, *a, **k)
                return wrapper
            return attr

    recording = RecordingFS()
    from pipelines.train.trainer import math_signature

    cfg = make_config("/unused", workers=2, ep=2)
    state = checkpointing.load_rank_state(recording, path, 1, math_signature(cfg), 2, 2)
    assert state["step"] == 8
    assert [p.rsplit("/", 1)[1] for p in opened] == ["meta.json", "rank-00001.shard"]
    # A config that changes the math is refused, naming the key.
    changed = make_config("/unused", "train.lr=0.1", workers=2, ep=2)
    with pytest.raises(ValueError, match="train.lr"):
        checkpointing.load_rank_state(recording, path, 1, math_signature(changed), 2, 2)
    with pytest.raises(ValueError, match="written by 2 workers with ep=2; this run has 2 workers with ep=1"):
        checkpointing.load_rank_state(recording, path, 0, math_signature(cfg), 2, 1)


def test_a_job_run_again_on_fewer_workers_resumes_resharded(reference_ep2, data, tmp_path):
    """The job dies on 2 workers (ep=2) at step 7; run again under the same name on 1 worker, it resumes
    from its latest registered checkpoint (step 2, 4 or 6: Ray Train registers a reported checkpoint
    asynchronously, and on a loaded machine it has lagged 3 steps behind), resharded, and ends
    where the uninterrupted 2-worker run ends (to float rounding: the layout changes the order of sums)."""
    from ray.train import TrainingFailedError

    root, manifest = data
    crashing = make_config(str(tmp_path), "train.fault_injection=0:7", "train.max_failures=0",
                           "train.checkpoint_every=2", workers=2, ep=2)
    with pytest.raises(TrainingFailedError):
        run_pretrain(crashing, root, manifest)
    smaller = make_config(str(tmp_path), "train.max_failures=0", "train.checkpoint_every=2",
                          "train.micro_batch_size=4")
    out = run_pretrain(smaller, root, manifest)
    assert out.step == 8
    final, = final_shards(out.checkpoint_uri, 1)
    first, resumed = final["run_history"]
    assert first == {"from_step": 0, "world_size": 2, "ep": 2, "pp": 1}, final["run_history"]
    assert resumed["from_step"] in (2, 4, 6) and (resumed["world_size"], resumed["ep"]) == (1, 1), resumed
    reference = reference_ep2[1]
    for name, tensor in final["model"].items():
        want = (torch.cat([reference[0]["model"][name], reference[1]["model"][name]])
                if ".mlp.experts." in name else reference[0]["model"][name])
        rel = float((tensor - want).abs().max() / want.abs().max())
        assert rel < 2e-4, f"{name}: relative difference {rel:.2e} from the uninterrupted run"


def test_validation_before_launch(data):
    root, manifest = data
    cfg = make_config("/unused")
    with pytest.raises(ValueError, match="data.seq_len"):
        validate_against_data(make_config("/unused", "data.seq_len=16"), manifest, root)
    big = {**manifest, "vocab_size": 4096}
    with pytest.raises(ValueError, match="model.vocab_size"):
        validate_against_data(cfg, big, root)
    with pytest.raises(ValueError, match="train.ep"):
        make_config("/unused", workers=2, ep=3)
    with pytest.raises(ValueError, match="global_batch_size"):
        make_config("/unused", "train.global_batch_size=6", workers=2)


@pytest.fixture(scope="module")
def reference_pp2_ep2(ray_local, data, tmp_path_factory):
    """An uninterrupted run of 4 workers: 2 pipeline stages of 2 expert-parallel ranks each."""
    root, manifest = data
    cfg = make_config(str(tmp_path_factory.mktemp("ref-pp")), "train.pp=2", workers=4, ep=2)
    out = run_pretrain(cfg, root, manifest)
    return cfg, out, final_shards(out.checkpoint_uri, 4)


def test_a_killed_worker_of_a_pipeline_resumes_exactly_and_the_checkpoint_reads_whole(reference_pp2_ep2, data,
                                                                                       tmp_path):
    from pipelines.train.checkpointing import load_checkpoint_model

    root, manifest = data
    ref_cfg, ref_out, ref_shards = reference_pp2_ep2
    assert ref_out.step == 8
    # Each rank wrote its own stage: the embedding on the first stage's ranks, the head on the last's.
    assert all("model.embed_tokens.weight" in s["model"] and "lm_head.weight" not in s["model"] for s in ref_shards[:2])
    assert all("lm_head.weight" in s["model"] and "model.embed_tokens.weight" not in s["model"] for s in ref_shards[2:])
    cfg = make_config(str(tmp_path), "train.pp=2", "train.fault_injection=3:6", workers=4, ep=2)
    out = run_pretrain(cfg, root, manifest)
    assert storage.exists(storage.join(out.run_dir, "fault-injected-rank3-step6")), "the fault never fired"
    assert_same_training_state(final_shards(out.checkpoint_uri, 4), ref_shards)
    # The evaluate and export stages' reader puts the stages and the expert halves back together.
    model = load_checkpoint_model(ref_out.checkpoint_uri, ref_cfg)
    whole = model.state_dict()
    assert torch.equal(whole["lm_head.weight"], ref_shards[3]["model"]["lm_head.weight"])
    assert torch.equal(whole["model.embed_tokens.weight"], ref_shards[1]["model"]["model.embed_tokens.weight"])
    stack = "model.layers.3.mlp.experts.up_proj"
    assert torch.equal(whole[stack], torch.cat([ref_shards[2]["model"][stack], ref_shards[3]["model"][stack]]))
