"""DRSformer on DID-Data with the release's recipe. MEFC on, as the release trained it."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("DID-Data")
    config.use_mefc = True
    return config
