"""Distillation methods by name: one file each; import it here to register it."""

from kd.methods import (  # noqa: F401  (registration)
    attention_transfer,
    ctkd,
    dist,
    dkd,
    factor_transfer,
    fitnets,
    logit,
    nst,
    pure,
    reviewkd,
    rkd,
    tucker,
)
from kd.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method", "build_method"]


def build_method(spec, student_shapes, teacher_shapes) -> Method:
    """The method module for a spec; the temperature is a shared spec field, not an option."""
    cls = METHODS[spec.method]
    return cls(student_shapes, teacher_shapes, temperature=spec.temperature, **spec.options)
