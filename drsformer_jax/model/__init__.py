"""The DRSformer network (Flax linen): U-Net, TKSA attention, MSFN, MEFC, layers.

`cpu_stencils` is apart from the model: the CPU formulation of its depthwise and grouped
convolutions, performance only (equal to `lax.conv`, as tests/test_model.py checks).
"""

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
