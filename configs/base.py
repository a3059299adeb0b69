"""The library defaults of a run (ruscarl_jax/trainer/defaults.py): every settings dataclass at its
defaults (the reference implementation's where it has one), no warm start, the full scaffold wording.
The other configs build on it: configs/tiny.py (the toy task), configs/qwen7b.py (the paper's run).
It does not run as it is: it needs a model checkpoint, a training split and a judge.
"""
import ml_collections

from ruscarl_jax.trainer.defaults import base_config


def get_config() -> ml_collections.ConfigDict:
    return base_config()
