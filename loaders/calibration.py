"""Calibration inside ComfyUI: sample the user's prompts with the model's own sampler and record every
call the sampler makes to the model, so that the quantizer can replay them block by block.

A call is recorded as the arguments of ``BaseModel.apply_model`` (the noisy latent, sigma and the
conditioning dict: text embeddings, pooled vector, guidance, ControlNet residuals, transformer_options),
innermost under any function wrapper already on the MODEL. Its tensors are kept on the offload device;
replaying it runs the same forward through ComfyUI again, with the MODEL's patches, wrappers and
low-VRAM weight streaming, so the layers see exactly the inputs they see when the user samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.utils
import node_helpers
import torch

from ..svdquant.errors import CalibrationError, ConfigError


@dataclass(frozen=True)
class SamplingSettings:
    """How the calibration prompts are sampled (one run per prompt)."""

    steps: int = 20
    width: int = 1024
    height: int = 1024
    seed: int = 0  # prompt i uses seed + i
    cfg: float = 1.0
    guidance: float | None = 3.5  # FLUX's guidance embedding; None leaves the prompts' own value
    sampler: str = "euler"
    scheduler: str = "simple"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"calibration steps = {self.steps}: at least 1")
        if self.width < 16 or self.height < 16 or self.width % 8 or self.height % 8:
            raise ConfigError(f"calibration resolution {self.width}×{self.height}: both sides must be multiples "
                              "of 8, at least 16")


Conditioning = list  # ComfyUI's CONDITIONING: [[embedding tensor, {"pooled_output": ..., ...}], ...]


def calibration_prompts(conditionings: Iterable[Conditioning | None]) -> list[Conditioning]:
    """Every entry of every given CONDITIONING, each as a prompt of its own."""
    prompts = []
    for conditioning in conditionings:
        if conditioning is None:
            continue
        for entry in conditioning:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], torch.Tensor)
                    and isinstance(entry[1], dict)):
                raise CalibrationError("a calibration conditioning is not ComfyUI CONDITIONING "
                                       "([[embedding, {...}], ...]); connect the output of a text encode node")
            prompts.append([list(entry)])
    if not prompts:
        raise CalibrationError("no calibration prompts: the calibration conditioning is empty; connect at least "
                               "one encoded prompt")
    return prompts


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside its dicts, lists and tuples moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if type(value) in (list, tuple):  # not named tuples and other subclasses: those are kept as they are
        return type(value)(_to(v, device) for v in value)
    return value


class RecordedCall:
    """One forward of the sampler, replayable: calling it runs ``apply_model`` on the same arguments."""

    def __init__(self, model, x: torch.Tensor, timestep: torch.Tensor, c: dict, store: torch.device):
        self.model, self.device = model, x.device
        self.x, self.timestep, self.c = x.to(store), timestep.to(store), _to(c, store)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    def __call__(self) -> torch.Tensor:
        return self.run(self.model)

    def run(self, model) -> torch.Tensor:
        """This forward on ``model`` (a BaseModel of the same family): its ``apply_model`` output."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        return model.apply_model(self.x.to(self.device), self.timestep.to(self.device), **_to(self.c, self.device))


def _zeroed(prompt: Conditioning) -> Conditioning:
    """The prompt's unconditional counterpart when no negative is given (as ConditioningZeroOut)."""
    out = []
    for embedding, values in prompt:
        values = dict(values)
        if isinstance(values.get("pooled_output"), torch.Tensor):
            values["pooled_output"] = torch.zeros_like(values["pooled_output"])
        out.append([torch.zeros_like(embedding), values])
    return out


def record_calls(model, prompts: list[Conditioning], negative: Conditioning | None, settings: SamplingSettings,
                 step_done: Callable[[], None] | None = None) -> list[RecordedCall]:
    """Sample every prompt with ``model`` (a ModelPatcher this function may modify: pass a clone) and
    return the calls the sampler made to the diffusion model, in order. ``step_done`` is called after
    each sampling step."""
    calls: list[RecordedCall] = []
    outer = model.model_options.get("model_function_wrapper")

    def recording(apply_model):
        def run(x, timestep, **c):
            calls.append(RecordedCall(model.model, x, timestep, c, model.offload_device))
            return apply_model(x, timestep, **c)
        return run

    def wrapper(apply_model, args: dict):
        if outer is not None:
            return outer(recording(apply_model), args)
        return recording(apply_model)(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    latent = torch.zeros([1, 4, settings.height // 8, settings.width // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    for index, prompt in enumerate(prompts):
        positive = prompt
        if settings.guidance is not None:
            positive = node_helpers.conditioning_set_values(prompt, {"guidance": settings.guidance})
        seed = settings.seed + index
        comfy.sample.sample(
            model, comfy.sample.prepare_noise(latent, seed), settings.steps, settings.cfg, settings.sampler,
            settings.scheduler, positive, negative if negative is not None else _zeroed(prompt), latent, seed=seed,
            callback=(lambda *_: step_done()) if step_done else None,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        )
    return calls
