"""Distillation methods by name: one file each; import it here to register it."""

from kd.methods import (  # noqa: F401  (registration)
    attention_transfer,
    crd,
    ctkd,
    dist,
    dkd,
    factor_transfer,
    fitnets,
    logit,
    mlkd,
    nst,
    pure,
    reviewkd,
    rkd,
    tucker,
)
from kd.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method", "build_method"]


def build_method(spec, student_shapes, teacher_shapes, train_labels=None) -> Method:
    """The method module for a spec; the temperature is a shared spec field, not an option.
    `train_labels`: the run's training split's labels (Method: what a method sized by it needs)."""
    cls = METHODS[spec.method]
    return cls(student_shapes, teacher_shapes, train_labels=train_labels, temperature=spec.temperature,
               **spec.options)
