"""The embedded default: a small DRSformer on generated rain, no download needed.

Finishes in minutes on a 2-core CPU: `python main.py --config configs/synthetic.py
--workdir /tmp/drsformer_synthetic`. The data set is generated once under
data/synthetic/ (heavy, Rain200H-like streaks on procedural scenes).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("synthetic")
    config.dataset.synthetic.num_train = 256
    config.dataset.synthetic.num_test = 16
    config.dataset.synthetic.height = 192
    config.dataset.synthetic.width = 192
    config.dataset.synthetic.regime = "heavy"

    # Small, and without MEFC (as for Rain200L): full-resolution depthwise
    # convolutions dominate a training step on CPU, and MEFC has dozens of them.
    config.dim = 16
    config.num_blocks = (1, 1, 1, 1)
    config.heads = (1, 1, 2, 2)
    config.use_mefc = False
    # Two CPU devices of batch 4: small ops leave a core idle; 0.88 -> 0.73 s a step.
    config.cpu_devices = 2

    config.seed = 0
    config.num_train_steps = 250
    config.global_batch_size = 8
    config.crop_size = 48
    config.learning_rate = 1e-3
    config.lr_constant_steps = 100
    config.lr_cosine_steps = 150
    config.log_every_steps = 25
    config.eval_every_steps = 125
    config.checkpoint_every_steps = 125
    config.eval_protocol = "matlab"
    return config
