"""Global batch sizes in config validation: sizes that do not split over the processes or the
data-parallel devices are ConfigErrors naming the key and the numbers, before anything compiles."""
import pytest

from configs.tiny import get_config
from ruscarl_jax.trainer.config import ConfigError, validate


def _config(**grpo):
    c = get_config()
    c.data.batch_size, c.rollout.num_generations = 4, 2  # 8 rows in the global batch
    c.grpo.update({"ppo_mini_batch_size": 4, "ppo_micro_batch_size": 4, **grpo})
    return c


def test_global_sizes_that_fit_are_accepted():
    settings = validate(_config(), num_devices=4, process_count=2)
    assert settings.grpo.ppo_mini_batch_size == 4 and settings.grpo.logprob_rows == 4


@pytest.mark.parametrize("change, devices, processes, message", [
    (dict(batch=3), 2, 2, "config.data.batch_size: 3 prompts (the global batch of all processes) do not split over 2 processes"),
    (dict(batch=3), 4, 1, "config.data.batch_size: 3 prompts x 2 generations = 6 rows (the global batch), which do not "
                          "divide across the 4 data-parallel devices"),
    (dict(ppo_micro_batch_size=2), 4, 2, "config.grpo.ppo_micro_batch_size: 2 rows (counted over all processes) do not "
                                         "divide across the 4 data-parallel devices"),
    (dict(ppo_mini_batch_size=2, ppo_micro_batch_size=2), 4, 1, "config.grpo.ppo_mini_batch_size: 2 rows"),
    (dict(logprob_micro_batch_size=6), 2, 2, "config.grpo.logprob_micro_batch_size: rollout batch has 8 rows"),
    (dict(logprob_micro_batch_size=2), 4, 2, "config.grpo.logprob_micro_batch_size: 2 rows (counted over all processes)"),
    (dict(ppo_mini_batch_size=16), 2, 2, "config.grpo.ppo_mini_batch_size: rollout batch has 8 rows"),
])
def test_indivisible_sizes_name_the_key_and_numbers(change, devices, processes, message):
    c = _config(**{k: v for k, v in change.items() if k != "batch"})
    if "batch" in change:
        c.data.batch_size = change["batch"]
    with pytest.raises(ConfigError) as err:
        validate(c, num_devices=devices, process_count=processes)
    assert message in str(err.value)


def test_data_parallel_size_not_a_multiple_of_the_process_count_is_an_error():
    # 4 processes over a data x tensor = 2 x 2 mesh: the rows of 4 processes cannot own 2 data shards
    c = _config()
    c.mesh.update(dict(data=2, tensor=2))
    with pytest.raises(ConfigError) as err:
        validate(c, num_devices=4, process_count=4)
    assert ("config.mesh: the data-parallel size 2 (mesh data=2 x fsdp=1, the axes of the 'batch' sharding rule) is not "
            "a multiple of the 4 processes (distributed.num_processes)") in str(err.value)
    validate(c, num_devices=4, process_count=2)  # 2 processes own one data shard each


def test_preemption_grace_must_be_positive():
    c = _config()
    assert validate(c, num_devices=4).grpo  # the default (25 s) is valid
    c.trainer.preemption_grace_s = 0.0
    with pytest.raises(ConfigError, match=r"config.trainer.preemption_grace_s: must be a number of seconds > 0, got 0.0"):
        validate(c, num_devices=4)


def test_routing_mismatch_metric_needs_a_moe_model():
    c = _config(routing_mismatch_metric=True)
    with pytest.raises(ConfigError, match=r"config.grpo.routing_mismatch_metric: needs a mixture-of-experts model"):
        validate(c, num_devices=4)
