"""Train with your own reward: any function (images, prompts, metadata) -> (rewards, info).

Here, brightness: the mean pixel value of each image in [0, 1]. Point the config at it as
'path/to/file.py:function' (or 'package.module:function' for an installed module):

    ddpo-lite train --preset tiny --set reward.name='examples/custom_reward.py:brightness'

or run this file, which does the same through the Python API.
"""

from __future__ import annotations

import numpy as np


def brightness(images, prompts, metadata):
    """Mean pixel value per image, in [0, 1]; `info` carries anything worth logging."""
    values = np.array(
        [np.asarray(image.convert("L"), dtype=np.float64).mean() / 255 for image in images]
    )
    return values, {"brightness": values}


if __name__ == "__main__":
    from ddpo_lite import load_config, train

    config = load_config(
        "tiny",
        [
            f"reward.name='{__file__}:brightness'",
            'output_dir="runs/custom-reward"',
            "num_epochs=3",
        ],
    )
    result = train(config, overwrite=True)
    print([round(row["reward_mean"], 4) for row in result.metrics])
