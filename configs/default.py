"""The release's training recipe (Options/Deraining.yml), shared by the data set configs.

Every field can be overridden on the command line, e.g.
`python main.py --config configs/rain200h.py --workdir DIR --config.num_train_steps=1000`.
"""

import ml_collections

from drsformer_jax.data.sources import default_dataset_config
from drsformer_jax.release import RELEASE_OPTIM


def get_config(dataset: str = "Rain200H") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = default_dataset_config(dataset)

    # Model (DRSformer's constructor fields; the defaults are the released model's).
    config.inp_channels = 3
    config.out_channels = 3
    config.dim = 48
    config.num_blocks = (4, 6, 6, 8)
    config.heads = (1, 2, 4, 8)
    config.ffn_expansion_factor = 2.66
    config.bias = False
    config.layernorm_type = "WithBias"
    config.use_mefc = True  # off for Rain200L and SPA-Data, as the release trained them
    config.dtype = "float32"  # computation dtype: "float32" or "bfloat16"
    # "blocks": rematerialise each transformer block / MEFC to save memory; or "none".
    config.remat = "none"
    config.conv_impl = "auto"  # depthwise/grouped conv formulation: auto, xla, shift
    config.layout = "auto"  # activations inside the model: auto (NCHW on CPU), NHWC, NCHW
    # Matmuls and convolutions: "default" is bfloat16 passes on TPU and TF32 on recent
    # GPUs (float32 on CPU); "highest" is true float32 everywhere, slower on accelerators.
    config.matmul_precision = "default"
    # CPU hosts: train on this many JAX CPU devices, the batch split over them (data
    # parallel, like GPUs): small models keep both cores busier. Applied by main.py
    # before JAX starts; 0 = JAX's default (one CPU device). Accelerators ignore it.
    config.cpu_devices = 0

    # Where the parameters start: "" = PyTorch's default init (seed below); or an export
    # directory, a training workdir (its best checkpoint), a step directory or a release
    # .pth to fine-tune from (fresh optimizer, step 0). A workdir with checkpoints resumes.
    config.init_from = ""

    # Optimisation: L1 loss, AdamW, constant 92k then cosine to 1e-6 over 208k. The
    # release's fields (drsformer_jax/release.py, RELEASE_OPTIM): seed (its manual_seed),
    # learning_rate, min_learning_rate, lr_constant_steps, lr_cosine_steps, adam_b1,
    # adam_b2, adam_eps, weight_decay, grad_clip_norm.
    config.update(RELEASE_OPTIM)
    config.num_train_steps = 300_000
    config.global_batch_size = 16  # 4 pairs on each of the release's 4 GPUs
    config.crop_size = 128

    # Logging, evaluation, checkpoints.
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the latest few; the best by PSNR is kept as well
    config.eval_protocol = "basicsr"  # the release's in-training validation (Y, float)
    return config
