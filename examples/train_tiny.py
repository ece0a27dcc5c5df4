"""Train a LoRA with DDPO on the offline tiny model, then load it into a plain diffusers pipeline.

    python examples/train_tiny.py

Runs on a CPU in about a minute; swap the preset for a real one on a GPU.
"""

import torch

from ddpo_lite import load_config, load_pipeline, train


def main() -> None:
    config = load_config("tiny", ["num_epochs=2", 'output_dir="runs/example-tiny"'])
    result = train(config)
    for row in result.metrics:
        print(f"epoch {row['epoch']}: reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f}")

    # the LoRA is a plain diffusers LoRA: any StableDiffusionPipeline of the base model loads it
    pipe = load_pipeline(config.model.name)
    pipe.load_lora_weights(result.lora_dir)
    image = pipe(
        "a cat", num_inference_steps=10, generator=torch.Generator().manual_seed(0)
    ).images[0]
    image.save(result.output_dir / "example.png")
    print(f"LoRA in {result.lora_dir}; sample in {result.output_dir / 'example.png'}")


if __name__ == "__main__":
    main()
