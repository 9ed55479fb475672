"""The stage protocol every stage runs under (``pipelines.stages.cache.cached_stage``): reuse, wipe, resume,
and that nothing is ever marked complete that was not fully written. Local disk and the S3 server."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.stages.cache import cached_stage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"s3://{request.getfixturevalue('s3_bucket')}/root"


class Stage:
    """A stage that writes ``part-<i>`` files, counts its builds and can fail after writing some."""

    def __init__(self, parts: int = 2, fail_after: int | None = None):
        self.parts, self.fail_after, self.builds = parts, fail_after, 0

    def build(self, folder: str):
        self.builds += 1
        for i in range(self.parts):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("killed mid-stage")
            storage.write_bytes(storage.join(folder, f"part-{i}"), b"x" * (i + 1))
        return {"folder": folder, "reused": False}, {"parts": self.parts}

    def load(self, record):
        return {"record": record, "reused": True}


def files(folder: str) -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in storage.list_files(folder)]


def test_builds_once_then_reuses(root):
    folder = storage.stage_dir(root, "s", "f1")
    stage = Stage()
    assert cached_stage(folder, stage.build, stage.load) == {"folder": folder, "reused": False}
    assert storage.read_complete(folder) == {"parts": 2}
    assert cached_stage(folder, stage.build, stage.load) == {"record": {"parts": 2}, "reused": True}
    assert stage.builds == 1
    assert cached_stage(folder, stage.build, stage.load, force=True)["reused"] is False
    assert stage.builds == 2


def test_partial_output_is_wiped_before_a_rebuild(root):
    folder = storage.stage_dir(root, "s", "f2")
    storage.write_bytes(storage.join(folder, "stale-from-a-killed-run"), b"junk")
    stage = Stage()
    cached_stage(folder, stage.build, stage.load)
    assert files(folder) == ["_COMPLETE.json", "part-0", "part-1"]


def test_a_failed_build_leaves_nothing_and_no_marker(root):
    folder = storage.stage_dir(root, "s", "f3")
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        cached_stage(folder, Stage(parts=3, fail_after=2).build, Stage().load)
    assert not storage.exists(folder) and not storage.is_complete(folder)
    # A complete earlier output survives neither a forced failing rebuild as complete nor as partial.
    cached_stage(folder, Stage().build, Stage().load)
    with pytest.raises(RuntimeError):
        cached_stage(folder, Stage(parts=3, fail_after=1).build, Stage().load, force=True)
    assert not storage.is_complete(folder)


def test_resumable_stage_keeps_its_partial_output(root):
    """Pretraining: an unfinished run's folder holds the checkpoints a rerun resumes from."""
    folder = storage.stage_dir(root, "s", "f4")
    with pytest.raises(RuntimeError):
        cached_stage(folder, Stage(parts=3, fail_after=2).build, Stage().load, resumable=True)
    assert files(folder) == ["part-0", "part-1"]  # kept, not marked complete
    seen = {}

    def resume(f: str):
        seen["found"] = files(f)
        return Stage(parts=3).build(f)

    cached_stage(folder, resume, Stage().load, resumable=True)
    assert seen["found"] == ["part-0", "part-1"] and storage.read_complete(folder) == {"parts": 3}
    # force starts it from nothing.
    storage.write_bytes(storage.join(folder, "old-checkpoint"), b"c")

    def fresh(f: str):
        seen["forced"] = files(f) if storage.exists(f) else []
        return None, {"parts": 0}

    cached_stage(folder, fresh, Stage().load, force=True, resumable=True)
    assert seen["forced"] == [] and storage.read_complete(folder) == {"parts": 0}
