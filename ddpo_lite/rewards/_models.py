"""Loading and running code shared by the model-based rewards (aesthetic, CLIPScore, PickScore,
ImageReward, HPS, prompt alignment), so each reward module holds only what is its own: the
published architecture, its preprocessing and its score.

- Sources: a hub id (downloaded through huggingface_hub's cache) or a local folder/file.
- Weights files: safetensors, or a torch checkpoint read with `torch.load(weights_only=True)`;
  nothing is ever unpickled.
- Image processors: always the PIL backend (`pil_image_processor`), so that a score does not
  depend on whether torchvision is installed (transformers picks its torchvision backend then).
- Placement: fp16 on a GPU, fp32 on the CPU; with `offload=True` the models live on the CPU and
  visit the device only for a call.
- `BatchedReward` turns a per-batch scoring function into the reward protocol.

torch and transformers are imported inside functions: importing ddpo_lite.rewards stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation, used by CLIP, BLIP (ImageReward) and OpenCLIP ViT-H (HPS).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardModelError(RuntimeError):
    """A reward model could not be found or read; the message says what to pass instead."""


def resolve_dtype(device: str, dtype: str | None = None):
    """The dtype a frozen reward model runs in: fp16 on a GPU, fp32 on the CPU, unless named."""
    import torch

    if dtype is not None:
        names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown reward dtype {dtype!r}; expected one of {sorted(names)}")
        return names[dtype]
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def resolve_file(source: str, filename: str) -> Path:
    """A local file, a file `filename` inside a local folder, or `filename` from the hub repo
    `source` (the hub form `owner/repo:file` names another file of that repo)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise RewardModelError(f"{filename!r} not found in the folder {str(path)!r}")
        return path / filename
    repo_id, _, named = source.partition(":")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, named or filename))
    except Exception as error:  # offline, unknown repo, missing file: say what to do
        raise RewardModelError(
            f"could not get {named or filename!r} from the hub repo {repo_id!r} ({error}); "
            "download it once, or pass a local file or folder"
        ) from error


def beside(model: str | None, markers: Sequence[str], default: str) -> str:
    """The folder `model` when it holds any of `markers` (so one local folder can carry a
    reward's companion files: head, tokenizer, processor), else `default`."""
    folder = Path(model).expanduser() if model else None
    if folder is not None and folder.is_dir() and any((folder / m).is_file() for m in markers):
        return str(folder)
    return default


def from_pretrained(cls, source: str, **kwargs):
    """`cls.from_pretrained(source)` with an error that says what to do when it fails. For a
    model, a weight that is missing from the checkpoint or of another shape is an error, not a
    random initialisation (transformers only logs it)."""
    is_model = hasattr(cls, "base_model_prefix")
    try:
        loaded = cls.from_pretrained(
            source, **kwargs, **({"output_loading_info": True} if is_model else {})
        )
    except OSError as error:
        raise RewardModelError(
            f"could not load {cls.__name__} from {source!r} ({error}); pass a hub id that is "
            "in the cache (or reachable), or a local folder written by save_pretrained"
        ) from error
    if not is_model:
        return loaded
    model, info = loaded
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise RewardModelError(
            f"{cls.__name__} from {source!r}: the checkpoint does not fit the architecture "
            f"(missing {sorted(missing)[:5]}, other shape {sorted(mismatched)[:5]})"
        )
    return model


def pil_image_processor(source: str):
    """`source`'s image processor with the PIL backend, whether or not torchvision is installed.

    transformers' automatic choice is torchvision's backend when torchvision is installed and
    PIL's otherwise, and the two resize differently (PickScore moved by 7e-4), so the backend
    is pinned (`backend="pil"`). PIL's is the one the reference implementations used (their
    transformers had no other).
    """
    from transformers import AutoImageProcessor

    processor = from_pretrained(AutoImageProcessor, source, backend="pil")
    if not is_pil_image_processor(processor):
        raise RewardModelError(
            f"the image processor of {source!r} ({type(processor).__name__}) has no PIL "
            "backend; ddpo-lite's rewards need one so that scores do not depend on torchvision"
        )
    return processor


def is_pil_image_processor(processor) -> bool:
    """Whether `processor` is a PIL-backend image processor."""
    from transformers.image_processing_backends import PilBackend

    return isinstance(processor, PilBackend)


def load_state_dict(path: Path) -> dict:
    """Tensors from a safetensors file or a torch checkpoint (weights_only=True), with a wrapping
    `state_dict`/`model` entry and DataParallel's `module.` prefix removed."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise RewardModelError(
                f"{str(path)!r} is not a plain tensor checkpoint (read with weights_only=True: "
                f"{error}); convert it to safetensors"
            ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def load_exact(
    module, state: dict, what: str, ignore: Callable[[str], bool] = lambda k: False, assign=False
):
    """load_state_dict that fails on a missing or unexpected key (except those `ignore` allows).
    `assign=True` takes the tensors as they are (for a module built on the meta device)."""
    result = module.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not ignore(k)]
    if missing or unexpected:
        raise RewardModelError(
            f"{what}: the weights do not match the architecture; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def features(output):
    """transformers 4 returns the projected features as a tensor, 5 as `pooler_output`."""
    return output if hasattr(output, "dim") else output.pooler_output


def clip_pixels(images: Sequence[Image.Image], size: int):
    """OpenAI CLIP's transform with PIL: bicubic resize of the short side to `size`, centre
    crop, scale to [0, 1], normalise. -> float tensor (B, 3, size, size)."""
    import torch

    arrays = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size  # torchvision's Resize(size) and CenterCrop(size) arithmetic
        new_size = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        left = int(round((image.width - size) / 2))
        top = int(round((image.height - size) / 2))
        arrays.append(np.asarray(image.crop((left, top, left + size, top + size))))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class BatchedReward:
    """The reward protocol over a per-batch scoring function.

    `score(images, prompts, metadata) -> (scores tensor (b,), info {key: tensor (b,) or list})`
    runs under inference mode, on at most `batch_size` samples, with `models` on `device`.
    With `offload`, `models` sit on the CPU between calls.
    """

    def __init__(
        self,
        name: str,
        score: Callable,
        models: Sequence,
        device: str,
        dtype,
        offload: bool,
        batch_size: int,
    ):
        self.name, self.score, self.models = name, score, list(models)
        self.device, self.dtype, self.offload, self.batch_size = device, dtype, offload, batch_size
        for model in self.models:
            model.requires_grad_(False)
            model.eval()
            model.to("cpu" if offload else device, dtype=dtype)

    @contextlib.contextmanager
    def _placed(self):
        if not self.offload:
            yield
            return
        for model in self.models:
            model.to(self.device)
        try:
            yield
        finally:
            for model in self.models:
                model.to("cpu")
            if str(self.device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    def __call__(self, images, prompts, metadata) -> tuple[np.ndarray, dict[str, Any]]:
        import torch

        images, prompts, metadata = list(images), list(prompts), list(metadata)
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(
                f"reward {self.name!r}: got {len(images)} images, {len(prompts)} prompts and "
                f"{len(metadata)} metadata entries; they must be equally many"
            )
        scores: list[np.ndarray] = []
        info: dict[str, list] = {}
        with self._placed(), torch.inference_mode():
            for part in batches(len(images), self.batch_size):
                batch_scores, batch_info = self.score(images[part], prompts[part], metadata[part])
                scores.append(batch_scores.float().cpu().numpy().reshape(-1))
                for key, value in batch_info.items():
                    if torch.is_tensor(value):
                        value = value.float().cpu().numpy().reshape(-1).tolist()
                    info.setdefault(key, []).extend(value)
        rewards = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
        return rewards.astype(np.float32), {
            k: np.asarray(v) if v and not isinstance(v[0], str) else v for k, v in info.items()
        }
