"""Distillation: a student trained on a frozen teacher's softened outputs as well as on the labels.

It is a loss, `training.loss: {name: distillation, teacher: RUN_DIR, temperature: 4, soft_weight: 0.5}`, so the
student trains through the normal trainer under its strategies: every process builds the loss from the config
and holds its own teacher, frozen, in eval mode. The loss reads the batch's inputs (`takes_inputs`), which the
trainer passes to such a loss; without them (validation) it is the hard loss alone, so `val_loss` stays the
cross-entropy that other runs report. `scaleforge distill TEACHER_RUN STUDENT_CONFIG` sets it up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleforge.data.base import DataInfo
from scaleforge.errors import ConfigError, UsageError
from scaleforge.registry import register_loss


@register_loss("distillation")
class DistillationLoss(nn.Module):
    """`soft_weight * T^2 * KL(teacher / T || student / T) + (1 - soft_weight) * cross_entropy(student, labels)`;
    T^2 keeps the soft term's gradients on the scale of the hard one's as T changes (Hinton et al., 2015)."""

    tasks = ("classification",)
    takes_inputs = True

    def __init__(
        self,
        teacher: str,
        num_classes: int,
        temperature: float = 4.0,
        soft_weight: float = 0.5,
        trust_teacher_code: bool = False,
    ) -> None:
        """`trust_teacher_code`: build the teacher even if its run names code (`imports:`, `module:Attr`)."""
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= soft_weight <= 1:
            raise ValueError(f"soft_weight must be between 0 and 1, got {soft_weight}")
        self.temperature, self.soft_weight = temperature, soft_weight
        self.teacher = _load_teacher(teacher, num_classes, trust_teacher_code)

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()  # frozen: dropout off and BatchNorm statistics fixed, whatever the student does
        return self

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        hard = F.cross_entropy(logits, targets)
        if inputs is None or self.soft_weight == 0:
            return hard
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits.float() / t, dim=-1),
            F.log_softmax(teacher_logits.float() / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        return self.soft_weight * t * t * soft + (1 - self.soft_weight) * hard


def _load_teacher(path: str, num_classes: int, trust_code: bool) -> nn.Module:
    from scaleforge.runs import load_run

    try:
        run = load_run(path, trust_code=trust_code)
    except UsageError as error:
        raise ConfigError(f"training.loss.teacher: {error}") from error
    info: DataInfo = run.info
    if info.num_classes != num_classes:
        raise ConfigError(
            f"training.loss.teacher: {path} predicts {info.num_classes} classes, the student's data has {num_classes}"
        )
    teacher = run.model  # in eval mode, as `load_run` leaves it
    teacher.requires_grad_(False)
    return teacher
