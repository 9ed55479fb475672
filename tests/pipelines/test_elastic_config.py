"""Config for whole-node faults: elastic worker ranges (every size a valid layout, checked when the config
loads), the layout each size runs, and custom worker resources."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, config_from_dict, load_config

BATCH = ["train.micro_batch_size=2", "train.global_batch_size=8"]


@pytest.mark.parametrize("given", ["1-2", "[1, 2]", "(1,2)", " 1 - 2 "])
def test_a_worker_range_sets_the_fewest_and_the_most(given):
    t = load_config(None, [f"train.num_workers={given}", "train.ep=2", *BATCH]).train
    assert (t.min_workers, t.num_workers, t.worker_counts) == (1, 2, (1, 2))


def test_each_size_runs_the_largest_expert_parallel_degree_that_fits_and_the_same_batch():
    t = load_config(None, ["train.num_workers=2-4", "train.ep=4", "model.num_experts=8", "train.micro_batch_size=1",
                           "train.global_batch_size=24"]).train
    assert [(w, t.at_world(w).ep) for w in (2, 3, 4)] == [(2, 2), (3, 1), (4, 4)]
    assert all(t.at_world(w).global_batch_size == 24 and t.at_world(w).min_workers is None for w in (2, 3, 4))
    with pytest.raises(ConfigError, match="an elastic group may run with 3 workers"):
        load_config(None, ["train.num_workers=2-4", "train.ep=2", *BATCH])


def test_a_range_of_one_size_is_a_fixed_group_and_round_trips():
    cfg = load_config(None, ["train.num_workers=2-2", "train.ep=2", "train.micro_batch_size=4"])
    assert cfg.train.min_workers is None and cfg.train.num_workers == 2
    elastic = load_config(None, ["train.num_workers=1-2", *BATCH])
    assert config_from_dict(elastic.to_dict()).train == elastic.train


@pytest.mark.parametrize("given, message", [
    ("3-2", "first count must not exceed"),
    ("[1, 2, 3]", "a count or a range MIN-MAX"),
    ("a-b", "expected an integer"),
])
def test_a_bad_range_names_the_key(given, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"train.num_workers={given}", *BATCH])


def test_a_range_and_min_workers_together_are_refused():
    with pytest.raises(ConfigError, match="give one of them"):
        load_config(None, ["train.num_workers=1-2", "train.min_workers=1", *BATCH])


def test_worker_resources_parse_and_bad_ones_name_the_entry():
    t = load_config(None, ["train.worker_resources=k2node:1,accel_h200:0.5"]).train
    assert t.worker_resource_map == {"k2node": 1.0, "accel_h200": 0.5}
    for bad in ("CPU:1", "k2node", "k2node:0", "two words:1"):
        with pytest.raises(ConfigError, match="worker_resources"):
            load_config(None, [f"train.worker_resources={bad}"])
