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
