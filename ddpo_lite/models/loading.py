"""Load a pipeline of a supported model family (SD 1.x/2.x, SDXL, SD3) from "tiny", "tiny-sdxl",
"tiny-sd3", "shapes", "shapes-flow", a local diffusers folder, or a Hub id; the family comes from
model_index.json.

Every failure a user can cause or fix (a wrong path, a folder in the wrong layout, no network) is a
`ModelLoadError` whose message is one line saying what was wrong and what to do instead.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler

from .tiny import quiet_progress_bars, tiny_pipeline_dir

__all__ = [
    "HUB_PROBE_TIMEOUT_S",
    "SHAPES_FLOW_MODEL_DIR",
    "SHAPES_MODEL_DIR",
    "ModelLoadError",
    "load_pipeline",
]

#: Seconds to wait for the Hugging Face Hub to answer before calling it unreachable
#: (``$DDPO_LITE_HUB_TIMEOUT`` overrides it).
HUB_PROBE_TIMEOUT_S = 5.0

_TINY_RE = re.compile(r"tiny(?::(\d+))?")
_TINY_SDXL_RE = re.compile(r"tiny-sdxl(?::(\d+))?")
_TINY_SD3_RE = re.compile(r"tiny-sd3(?::(\d+))?")
_TINY_FLUX_RE = re.compile(r"tiny-flux(?::(\d+))?")
_TINY_FLUX2_RE = re.compile(r"tiny-flux2(?::(\d+))?")
#: The small pretrained model shipped inside the package (trained by scripts/train_shapes_model.py).
SHAPES_MODEL_DIR = Path(__file__).parent / "shapes_model"
#: Its flow-matching sibling, an SD3 pipeline (trained by scripts/train_shapes_flow_model.py).
SHAPES_FLOW_MODEL_DIR = Path(__file__).parent / "shapes_flow_model"

_ACCEPTED_FORMS = (
    'accepted forms: "tiny" (or "tiny:SEED", the built-in offline test model), '
    '"shapes" (the built-in pretrained shapes-world model), "shapes-flow" (its SD3 sibling), '
    "a local folder with a diffusers Stable Diffusion layout (model_index.json, unet/, vae/, "
    'text_encoder/, tokenizer/, scheduler/), or a Hugging Face Hub id such as "owner/name"'
)
_OFFLINE_HINT = (
    'offline, use "tiny", "shapes", "shapes-flow", a local folder with a diffusers Stable '
    "Diffusion layout, or download the model beforehand (e.g. `hf download ID`) so it is in the local Hugging Face "
    "cache (set HF_HUB_OFFLINE=1 to skip the network entirely)"
)


class ModelLoadError(Exception):
    """A pipeline could not be loaded; the message says why and what to do."""


def load_pipeline(
    name_or_path: str = "tiny",
    *,
    seed: int = 0,
    torch_dtype: torch.dtype | None = None,
    family: str = "auto",
    memory=None,
):
    """Load a pipeline with a DDIM scheduler and progress bars off.

    ``name_or_path`` is one of:

    - ``"tiny"`` / ``"tiny:SEED"``: the built-in offline model (`tiny_pipeline_dir`), loaded with
      ``from_pretrained`` like any folder; ``seed`` applies to plain ``"tiny"``.
    - ``"tiny-sdxl"`` / ``"tiny-sdxl:SEED"``: the same in the SDXL architecture.
    - ``"tiny-sd3"`` / ``"tiny-sd3:SEED"``: the same in the SD3 (flow-matching MMDiT) one.
    - ``"tiny-flux"`` / ``"tiny-flux2"`` (``:SEED``): the same as FLUX.1-dev and FLUX.2-klein.
    - ``"shapes"``: the small pretrained model that ships inside the package (``SHAPES_MODEL_DIR``;
      32x32 coloured shapes, captions like "a red circle on a blue background").
    - ``"shapes-flow"``: the same world in the SD3 architecture (``SHAPES_FLOW_MODEL_DIR``), a
      flow-matching MMDiT without T5, trained with no T5 tokens: the pipeline gets
      ``t5_sequence_length = 0``, the model's default that ``model.max_sequence_length = -1``
      resolves to (`families.sequence_length`) and the sd3 family passes to ``encode_prompt``
      as ``max_sequence_length`` (in plain diffusers: ``pipe(prompt, max_sequence_length=0)``).
    - a local folder in diffusers layout (``model_index.json`` and the component subfolders).
    - a Hub id ``"owner/name"``: the local Hugging Face cache first, then the Hub.

    ``family`` is "auto" (model_index.json's ``_class_name`` picks it) or a family name
    ("sd1", "sdxl") whose pipeline class then loads the folder whatever its class name.
    Any other scheduler is replaced by ``DDIMScheduler.from_config`` of its config (DDPO's policy
    is the DDIM step). The safety checker is never loaded.

    ``memory`` (a `MemoryConfig`) applies the load-time levers: ``quantize_base`` 'nf4' / 'int8'
    (the denoiser through diffusers' BitsAndBytesConfig, `load_options`) and ``drop_t5``.

    Raises:
        ModelLoadError: the model could not be found or loaded; the message is one line.
    """
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype

    name = str(name_or_path).strip()
    if memory is not None:
        kwargs.update(load_options(memory))
    tiny = _TINY_RE.fullmatch(name)
    tiny_xl = _TINY_SDXL_RE.fullmatch(name)
    path = Path(name).expanduser()
    if tiny:
        tiny_seed = int(tiny.group(1)) if tiny.group(1) is not None else seed
        pipe = _from_folder(tiny_pipeline_dir(tiny_seed), kwargs, family)
    elif tiny_xl:
        from .tiny_sdxl import tiny_sdxl_pipeline_dir

        tiny_seed = int(tiny_xl.group(1)) if tiny_xl.group(1) is not None else seed
        pipe = _from_folder(tiny_sdxl_pipeline_dir(tiny_seed), kwargs, family)
    elif tiny_sd3 := _TINY_SD3_RE.fullmatch(name):
        from .tiny_sd3 import tiny_sd3_pipeline_dir

        tiny_seed = int(tiny_sd3.group(1)) if tiny_sd3.group(1) is not None else seed
        pipe = _from_folder(tiny_sd3_pipeline_dir(tiny_seed), kwargs, family)
    elif tiny_flux := _TINY_FLUX_RE.fullmatch(name):
        from .tiny_flux import tiny_flux_pipeline_dir

        tiny_seed = int(tiny_flux.group(1)) if tiny_flux.group(1) is not None else seed
        pipe = _from_folder(tiny_flux_pipeline_dir(tiny_seed), kwargs, family)
    elif tiny_flux2 := _TINY_FLUX2_RE.fullmatch(name):
        from .tiny_flux2 import tiny_flux2_pipeline_dir

        tiny_seed = int(tiny_flux2.group(1)) if tiny_flux2.group(1) is not None else seed
        pipe = _from_folder(tiny_flux2_pipeline_dir(tiny_seed), kwargs, family)
    elif name == "shapes":
        pipe = _from_folder(SHAPES_MODEL_DIR, kwargs, family)
    elif name == "shapes-flow":
        pipe = _from_folder(SHAPES_FLOW_MODEL_DIR, kwargs, family)
    elif path.is_dir():
        pipe = _from_folder(path, kwargs, family)
    elif path.exists():
        raise ModelLoadError(
            f"{name!r} is a file; single-file checkpoints are not supported, "
            "convert it to a diffusers folder first (diffusers' "
            "`StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR)`); "
            + _ACCEPTED_FORMS
        )
    elif _looks_like_hub_id(name):
        pipe = _from_hub(name, kwargs, family)
    else:
        raise ModelLoadError(
            f"{name!r} is neither an existing folder nor a Hub id; {_ACCEPTED_FORMS}"
        )

    from ddpo_lite.families import family_of

    if _is_shapes_flow(name, path):
        pipe.t5_sequence_length = 0  # trained with no T5 tokens (the pipeline's default is 256)
    if family_of(pipe).sampler == "ddim":  # the flow families keep their FlowMatch scheduler
        pipe.scheduler = ddim_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_bitsandbytes(kind: str) -> None:
    """`ModelLoadError` (one line) unless diffusers' bitsandbytes quantizer can run `kind` here:
    bitsandbytes installed, and a CUDA GPU (diffusers refuses to quantize without one, although
    bitsandbytes itself runs 4- and 8-bit layers on a CPU)."""
    import importlib.util

    setting = f"memory.quantize_base = {kind!r}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"{setting} needs bitsandbytes: pip install bitsandbytes, or use "
            "memory.quantize_base = 'fp8' (no extra package) or 'none'"
        )
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"{setting} cannot run on this device: diffusers' bitsandbytes quantizer needs a "
            "CUDA GPU and there is none; use memory.quantize_base = 'fp8' (layerwise fp8 storage "
            "runs anywhere) or 'none'"
        )


def load_options(memory) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for the load-time memory levers: a
    PipelineQuantizationConfig quantizing the denoiser alone (NF4 with double quantization and
    the autocast dtype for compute, as QLoRA; or LLM.int8), the other components loading in the
    frozen dtype; `drop_t5`: text_encoder_3 and tokenizer_3 as None (checked against the family
    in `_pipeline_kwargs`)."""
    from .memory import DTYPES, frozen_dtype

    options: dict[str, Any] = {}
    kind = getattr(memory, "quantize_base", "none")
    if kind in ("nf4", "int8"):
        check_bitsandbytes(kind)
        from diffusers import BitsAndBytesConfig

        compute = DTYPES[memory.mixed_precision]
        if kind == "nf4":
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            bnb = BitsAndBytesConfig(load_in_8bit=True)
        options[QUANTIZE_DENOISER] = bnb
        options["torch_dtype"] = frozen_dtype(memory.mixed_precision, memory.half_base)
    if getattr(memory, "drop_t5", False):
        options[DROP_T5] = True
    return options


#: `load_options`' quantization of the denoiser, whose name ("unet" / "transformer") comes with
#: the family.
QUANTIZE_DENOISER = "<quantize_denoiser>"
#: `load_options`' request to leave T5 out (resolved against the family's components).
DROP_T5 = "<drop_t5>"


def _resolve_options(found, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`load_options`' placeholders made concrete for the family `found`."""
    kwargs = dict(kwargs)
    quant = kwargs.pop(QUANTIZE_DENOISER, None)
    if quant is not None:
        from diffusers.quantizers import PipelineQuantizationConfig

        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_mapping={found.denoiser_name: quant}
        )
    if kwargs.pop(DROP_T5, False):
        if "text_encoder_3" not in getattr(found, "optional_components", ()):
            raise ModelLoadError(
                f"memory.drop_t5 applies to SD3 (StableDiffusion3Pipeline without T5); the "
                f"{found.name} model has no T5 to drop: set memory.drop_t5 = false"
            )
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    return kwargs


def _is_shapes_flow(name: str, path: Path) -> bool:
    """The shipped shapes-flow model, by name or by its folder."""
    if name == "shapes-flow":
        return True
    try:
        return path.is_dir() and path.resolve() == SHAPES_FLOW_MODEL_DIR.resolve()
    except OSError:
        return False


def ddim_scheduler(scheduler) -> DDIMScheduler:
    """The DDIM scheduler DDPO's policy steps with, from any scheduler's config.

    `set_alpha_to_one` is always False: True (DDIMScheduler's own default, so also what a
    non-DDIM config converts to) makes the last step go to alpha = 1, where the DDIM step's std
    is 0 and its log-probability NaN, and every sample would be dropped. False steps to the
    first training timestep's alpha, as Stable Diffusion's own scheduler config does.
    """
    if isinstance(scheduler, DDIMScheduler) and not scheduler.config.set_alpha_to_one:
        return scheduler
    if isinstance(scheduler, DDIMScheduler):
        warnings.warn(
            "the model's DDIM scheduler has set_alpha_to_one = True, which gives the last step "
            "std 0 (a NaN log-probability); ddpo-lite samples with set_alpha_to_one = False",
            stacklevel=3,
        )
    return DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False)


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message``, short enough for a one-line error."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _looks_like_hub_id(name: str) -> bool:
    """True for ``owner/name`` ids that the Hub could hold."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _family_from_index(index: dict, where: str, family: str):
    """The family for a model_index.json: `family` when named, else by `_class_name`."""
    from ddpo_lite.families import family_for_class, get_family, supported_classes

    if family != "auto":
        return get_family(family)
    class_name = str(index.get("_class_name", ""))
    found = family_for_class(class_name)
    if found is None:
        raise ModelLoadError(
            f"{where} holds a {class_name or 'pipeline without a _class_name'}; supported "
            f"pipelines: {', '.join(supported_classes())} (model.family forces one)"
        )
    return found


def _check_layout(folder: Path, family: str = "auto"):
    """The family of ``folder``; `ModelLoadError` unless it has that family's diffusers layout."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{str(folder)!r} is not a diffusers pipeline folder: model_index.json is missing; "
            + _ACCEPTED_FORMS
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read {str(index_file)!r}: {_one_line(err)}") from err
    if not isinstance(index, dict):
        raise ModelLoadError(f"{str(index_file)!r} is not a JSON object; {_ACCEPTED_FORMS}")
    found = _family_from_index(index, repr(str(folder)), family)
    missing = []
    for component in found.required_components:
        entry = index.get(component)
        if not (isinstance(entry, list) and entry and entry[0] is not None):
            missing.append(f"{component!r} in model_index.json")
        elif not (folder / component).is_dir():
            missing.append(f"{component}/")
    if missing:
        raise ModelLoadError(
            f"{str(folder)!r} is not a complete {found.pipeline_class.__name__} folder: missing "
            f"{', '.join(missing)}; " + _ACCEPTED_FORMS
        )
    return found


def _takes_dtype() -> bool:
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return False
    return True


#: Whether `from_pretrained` takes `dtype` (newer diffusers) or only `torch_dtype`.
_TAKES_DTYPE = _takes_dtype()


def _pipeline_kwargs(found, kwargs: dict[str, Any], index: dict | None = None) -> dict[str, Any]:
    """SD 1.x pipelines take no safety checker (it is never loaded); SDXL has none. An optional
    component model_index.json leaves out (SD3 without T5) is passed as None, as diffusers needs."""
    kwargs = _resolve_options(found, kwargs)
    if "torch_dtype" in kwargs and _TAKES_DTYPE:  # newer diffusers deprecate torch_dtype
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if found.name == "sd1":
        return {"safety_checker": None, "requires_safety_checker": False, **kwargs}
    absent = {
        name: None
        for name in getattr(found, "optional_components", ())
        if index is not None and not (isinstance(index.get(name), list) and index[name][0])
    }
    return {**absent, **kwargs}


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _from_folder(folder: Path, kwargs: dict[str, Any], family: str = "auto"):
    found = _check_layout(folder, family)
    kwargs = _pipeline_kwargs(found, kwargs, _read_index(folder))
    try:
        with quiet_progress_bars():
            return found.pipeline_class.from_pretrained(folder, **kwargs)
    except Exception as err:
        raise ModelLoadError(
            f"could not load the pipeline in {str(folder)!r}: {_one_line(err)}"
        ) from err


def _hub_offline() -> bool:
    """True when the user asked huggingface_hub not to use the network."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _probe_hub(repo_id: str, timeout: float) -> BaseException | None:
    """Ask the Hub about ``repo_id`` once, giving up after ``timeout`` seconds.

    Returns None when the repo answered, else the error (a `TimeoutError` when it did not answer in
    time). Runs in a daemon thread because name resolution is not bounded by HTTP timeouts.
    """
    from huggingface_hub import model_info

    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            model_info(repo_id, timeout=timeout)
            result.append(None)
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            result.append(err)

    thread = threading.Thread(target=probe, name="ddpo-lite-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return TimeoutError(f"no answer within {timeout:g} s")
    return result[0]


def _hub_family(repo_id: str, family: str, local_only: bool):
    """The family of a Hub repo from its model_index.json (cached, or downloaded)."""
    from huggingface_hub import hf_hub_download

    index_file = hf_hub_download(repo_id, "model_index.json", local_files_only=local_only)
    index = json.loads(Path(index_file).read_text(encoding="utf-8"))
    return _family_from_index(index, repr(repo_id), family)


def _from_hub(repo_id: str, kwargs: dict[str, Any], family: str = "auto"):
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        found = _hub_family(repo_id, family, local_only=True)
    except ModelLoadError:
        raise
    except Exception:  # not in the local cache
        found = None
    if found is not None:
        try:
            with quiet_progress_bars():
                return found.pipeline_class.from_pretrained(
                    repo_id, local_files_only=True, **_pipeline_kwargs(found, kwargs)
                )
        except Exception:  # not (fully) in the local cache: go to the Hub
            pass

    if _hub_offline():
        raise ModelLoadError(
            f"could not load {repo_id!r}: it is not a local folder, not in the local Hugging Face "
            f"cache, and HF_HUB_OFFLINE is set; {_OFFLINE_HINT}"
        )

    timeout = float(os.environ.get("DDPO_LITE_HUB_TIMEOUT", HUB_PROBE_TIMEOUT_S))
    err = _probe_hub(repo_id, timeout)
    if isinstance(err, GatedRepoError):
        raise ModelLoadError(
            f"{repo_id!r} is a gated Hub repo: accept its terms on huggingface.co and log in "
            "(`hf auth login`), or use a local folder"
        ) from err
    if isinstance(err, RepositoryNotFoundError):
        raise ModelLoadError(
            f"{repo_id!r} is not a local folder and the Hub has no such repo (or it is private: "
            f"log in with `hf auth login`); check the spelling; {_ACCEPTED_FORMS}"
        ) from err
    if isinstance(err, HfHubHTTPError):
        raise ModelLoadError(
            f"could not load {repo_id!r}: the Hugging Face Hub answered with an error "
            f"({_one_line(err)}); try again later, or {_OFFLINE_HINT}"
        ) from err
    if err is not None:
        raise ModelLoadError(
            f"could not load {repo_id!r}: it is not a local folder and the Hugging Face Hub could "
            f"not be reached ({_one_line(err)}); {_OFFLINE_HINT}"
        ) from err

    try:
        found = _hub_family(repo_id, family, local_only=False)
        return found.pipeline_class.from_pretrained(repo_id, **_pipeline_kwargs(found, kwargs))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {repo_id!r} from the Hugging Face Hub: {_one_line(exc)}; "
            "it must be a diffusers pipeline repo of a supported family (SD 1.x/2.x, SDXL)"
        ) from exc
