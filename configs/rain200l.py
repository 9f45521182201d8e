"""DRSformer on Rain200L with the release's recipe. Without MEFC, as the release trained it."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("Rain200L")
    config.use_mefc = False
    return config
