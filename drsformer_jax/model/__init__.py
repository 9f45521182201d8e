"""The DRSformer network (Flax linen): U-Net, TKSA attention, MSFN, MEFC, layers."""

from drsformer_jax.model.drsformer import (
    ARCH_FIELDS,
    SIZE_MULTIPLE,
    DRSformer,
    abstract_params,
    count_params,
    from_config,
    init_params,
    model_config,
)

__all__ = ["ARCH_FIELDS", "SIZE_MULTIPLE", "DRSformer", "abstract_params", "count_params",
           "from_config", "init_params", "model_config"]
