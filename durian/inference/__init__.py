"""Inference: user images and driving motion → animated portraits (method note §4)."""

from durian.inference.animate import Animation, alpha_schedule, animate, is_preset
from durian.inference.errors import DurianInputError
from durian.inference.prepare import Preparer, parse_attribute_spec, portrait_mask
from durian.inference.presets import PRESETS, preset_landmarks
from durian.inference.retarget import retarget_landmarks

__all__ = [
    "PRESETS",
    "Animation",
    "DurianInputError",
    "Preparer",
    "alpha_schedule",
    "animate",
    "is_preset",
    "parse_attribute_spec",
    "portrait_mask",
    "preset_landmarks",
    "retarget_landmarks",
]
