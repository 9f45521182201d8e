"""Fine-tune the released model on your own rain pairs (a camera, a city, real pairs).

    python -m drsformer_jax.convert --torch-checkpoint deraining.pth --output weights/rain200h
    python main.py --config configs/finetune.py --workdir DIR \\
        --config.dataset.name=MyRain --config.init_from=weights/rain200h

Data: `data/{train,test}/MyRain/{input,target}` (rainy and clean images of the same file
name; see data/README.md). `init_from` may also be the release's .pth itself. The run starts
from those weights with a fresh AdamW at step 0 and evaluates them first (step 0: the
released model's own score on your test pairs), then trains 10k steps: 2k at a constant
1e-4 (a third of the release's rate: the weights are already good), then cosine to 1e-6.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("Rain200H")  # the released model's architecture (MEFC on)
    config.dataset.name = "MyRain"
    config.init_from = "weights/rain200h"
    config.num_train_steps = 10_000
    config.learning_rate = 1e-4
    config.min_learning_rate = 1e-6
    config.lr_constant_steps = 2_000
    config.lr_cosine_steps = 8_000
    config.log_every_steps = 50
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 1_000
    return config
