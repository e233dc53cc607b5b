"""Device assignment on one host, with a faked GPU count: never shared by accident."""

import pytest

from asyncrl import devices
from asyncrl.config import ConfigError, load_config


def test_no_gpu_keeps_the_cpu_and_gloo():
    a = devices.assign(2, 2, [], [], "auto", visible=0)
    assert (a.generator_ids, a.learner_ids, a.backend) == ([], [], "gloo")


def test_visible_gpus_are_split_generators_first():
    a = devices.assign(4, 4, [], [], "auto", visible=8)
    assert a.generator_ids == [0, 1, 2, 3] and a.learner_ids == [4, 5, 6, 7]
    assert a.backend == "nccl"
    assert not set(a.generator_ids) & set(a.learner_ids)


def test_one_list_given_the_other_takes_the_remaining_gpus():
    a = devices.assign(2, 2, [], [0, 1], "auto", visible=4)
    assert a.generator_ids == [2, 3] and a.learner_ids == [0, 1]
    a = devices.assign(1, 3, [3], [], "nccl", visible=4)
    assert a.generator_ids == [3] and a.learner_ids == [0, 1, 2]


def test_one_gpu_one_generator_one_rank_is_colocated_over_ipc():
    a = devices.assign(1, 1, [], [], "auto", visible=1)
    assert (a.generator_ids, a.learner_ids, a.backend) == ([0], [0], "ipc")


def test_too_few_gpus_is_an_error_naming_the_fields():
    with pytest.raises(ConfigError, match=r"2 GPU\(s\) visible.*num_generators=2.*nproc=2"):
        devices.assign(2, 2, [], [], "auto", visible=2)


def test_apply_writes_the_assignment_into_the_config_and_revalidates():
    cfg = load_config(None, ["generator.num_generators=2", "learner.nproc=2",
                             "learner.groups_per_step=16"])
    a = devices.apply(cfg, visible=4)
    assert cfg.generator.device_ids == [0, 1] and cfg.learner.device_ids == [2, 3]
    assert cfg.weight_sync.backend == "nccl" and "gen1: GPU 1" in a.describe()


def test_overlapping_lists_under_nccl_are_refused_naming_both_fields():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["weight_sync.backend=nccl", "generator.device_ids=[0]",
                           "learner.device_ids=[0]"])
    msg = str(e.value)
    assert "generator.device_ids=[0]" in msg and "learner.device_ids=[0]" in msg
    assert "weight_sync.backend=ipc" in msg and "\n" not in msg


def test_ipc_is_for_one_rank_and_one_generator():
    with pytest.raises(ConfigError, match="weight_sync.backend=ipc"):
        load_config(None, ["weight_sync.backend=ipc", "generator.num_generators=2"])
    load_config(None, ["weight_sync.backend=ipc", "generator.device_ids=[0]", "learner.device_ids=[0]"])


def test_tensor_parallel_generators_take_consecutive_gpus():
    cfg = load_config(None, ["generator.num_generators=2", "generator.tensor_parallel_size=2",
                             "learner.nproc=2", "learner.groups_per_step=16"])
    devices.apply(cfg, visible=6)
    assert cfg.generator.device_ids == [0, 1, 2, 3] and cfg.learner.device_ids == [4, 5]
    with pytest.raises(ConfigError, match="tensor_parallel_size entries per generator"):
        load_config(None, ["generator.tensor_parallel_size=2", "generator.device_ids=[0]"])
