"""Real rainy photos with no ground truth (the paper's Table 2): evaluation only.

    python main.py --config configs/real.py --workdir DIR --mode evaluate \\
        --checkpoint weights/rain200h    # or deraining.pth

Derains `data/test/Real/input/*` (any image files; no target/ folder) and writes
NIQE / BRISQUE of every input and output to `DIR/eval/Real/score.json`.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("Rain200H")  # the released model's architecture
    config.dataset.name = "Real"
    config.dataset.benchmark_protocol = "niqe,brisque"
    return config
