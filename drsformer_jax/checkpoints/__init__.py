"""Checkpoints: weights directories, training checkpoints, release `.pth` files, `load`.

- `weights_dir`: weights directories, what `convert` writes (`config.json` + orbax `params/`).
- `training`: the orbax CheckpointManager of a training workdir.
- `torch_format`: the release's `.pth` files, read and written without PyTorch.
- `names`: the one two-way table of release <-> Flax parameter names.
- `loading`: `load(path)` for any of them.
"""
