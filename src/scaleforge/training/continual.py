"""Learning tasks one after another without forgetting the earlier ones (`training.continual`).

A sequence of tasks is a sequence of runs, each starting from the weights of the one before
(`training.init_from`) and training on its own data (such as `data.classes`, for class-incremental tasks).

`replay` (experience replay, as Avalanche's ReplayPlugin): a run keeps a buffer of `buffer_size` training samples
in its `final/replay.safetensors` (in the manifest, so verified like the weights); the next run of the sequence
adds that buffer to its own training data, and keeps a buffer drawn from both: every task so far, in equal shares
per class (`class_balanced`) or at random. The buffer is data (tensors in safetensors), never code.

`ewc` (elastic weight consolidation, Kirkpatrick et al. 2017, in its online form): a run keeps the diagonal Fisher
information of its task (the mean over mini-batches of the squared gradients of the loss, as Avalanche estimates
it) with its final weights in `final/ewc.safetensors`; the next run adds `ewc_lambda / 2 * sum(F * (w - w*)^2)` to
its training loss (w* those weights) and keeps the sum of the earlier Fisher and its own.

`lwf` (learning without forgetting, Li and Hoiem 2016): the distillation loss (compress/distill.py) with the run
the task starts from as its teacher: the new task's labels, and the old model's softened outputs on its inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from scaleforge.config import ComponentSpec, ContinualSection
from scaleforge.data.base import DatasetSplits, InMemoryDataset, gather, labels_of
from scaleforge.errors import ConfigError, UsageError

REPLAY_FILE = "replay.safetensors"
EWC_FILE = "ewc.safetensors"
PENALISED = ("single", "ddp")  # strategies whose processes hold whole parameters, which EWC's penalty reads


def earlier_file(
    init_from: str | None, name: str, signing_key_env: str | None = None
) -> dict[str, torch.Tensor] | None:
    """The tensors of file `name` that the run `init_from` kept in its final/ (checked against its manifest with
    every other file there); None when there is no run to start from or it kept none."""
    from safetensors.torch import load

    from scaleforge.runs import verify_final

    if init_from is None or Path(init_from).is_file():  # weights alone: nothing beside them
        return None
    try:
        final = verify_final(init_from, signing_key_env)
    except UsageError as error:
        raise ConfigError(f"training.init_from: {error}") from error
    if not (final / name).is_file():
        return None
    try:
        return load((final / name).read_bytes())
    except Exception as error:  # noqa: BLE001 - safetensors' own error types: a file it cannot read
        raise ConfigError(f"training.init_from: {final / name} cannot be read: {error}") from error


def earlier_buffer(init_from: str | None, signing_key_env: str | None = None) -> InMemoryDataset | None:
    """The replay buffer the run `init_from` kept; None when it kept none (a first task trained without replay)."""
    tensors = earlier_file(init_from, REPLAY_FILE, signing_key_env)
    if tensors is None:
        return None
    inputs, targets = tensors.get("inputs"), tensors.get("targets")
    if inputs is None or targets is None or len(inputs) != len(targets) or targets.dim() != 1:
        raise ConfigError(f"training.init_from: its {REPLAY_FILE} is not a buffer of inputs and one target each")
    return InMemoryDataset(inputs, targets)


def with_buffer(splits: DatasetSplits, buffer: InMemoryDataset) -> DatasetSplits:
    """`splits` whose training split also holds `buffer`'s samples (in memory at once when both are tensors)."""
    import dataclasses

    train, classes = splits.train, splits.info.num_classes
    if (
        classes is not None
        and len(buffer)
        and not 0 <= int(buffer.targets.min()) <= int(buffer.targets.max()) < classes
    ):
        raise ConfigError(
            f"training.continual: the replay buffer holds labels outside this dataset's {classes} classes"
        )
    if type(train) is InMemoryDataset:  # exactly: a subclass may hold no `inputs` tensor (GatheredImages)
        if buffer.inputs.shape[1:] != train.inputs.shape[1:]:
            raise ConfigError(
                f"training.continual: the replay buffer's inputs are {tuple(buffer.inputs.shape[1:])}, this "
                f"dataset's {tuple(train.inputs.shape[1:])}"
            )
        joined: Dataset = InMemoryDataset(
            torch.cat([train.inputs, buffer.inputs.to(train.inputs.dtype)]),
            torch.cat([train.targets, buffer.targets.to(train.targets.dtype)]),
        )
    else:
        joined = torch.utils.data.ConcatDataset([train, buffer])
    return dataclasses.replace(splits, train=joined)


def select_buffer(dataset: Dataset, section: ContinualSection, seed: int) -> dict[str, torch.Tensor]:
    """`section.buffer_size` samples of `dataset` (this task's training data with the earlier buffer), as the
    tensors of `replay.safetensors`: the same number from every class (those with fewer give all they have), or at
    random, drawn with the run's seed."""
    targets = labels_of(dataset)
    generator = torch.Generator().manual_seed(seed)
    if section.selection == "random":
        chosen = torch.randperm(len(targets), generator=generator)[: section.buffer_size]
    else:
        classes = targets.unique().tolist()
        chosen_parts = []
        for position, label in enumerate(classes):  # the remainder of the division goes to the first classes
            share = section.buffer_size // len(classes) + (position < section.buffer_size % len(classes))
            members = (targets == label).nonzero().flatten()
            chosen_parts.append(members[torch.randperm(len(members), generator=generator)[:share]])
        chosen = torch.cat(chosen_parts)
    chosen = chosen.sort().values
    inputs, labels = gather(dataset, chosen)
    return {"inputs": inputs.detach().cpu().contiguous(), "targets": labels.detach().cpu().contiguous()}


def check_continual(
    section: ContinualSection, task: str, strategy: str, init_from: str | None, *, quantization_aware: bool = False
) -> None:
    """A config error for a continual strategy the data, the parallel strategy or the start cannot take."""
    key = "training.continual.strategy"
    if section.strategy in ("replay", "lwf") and task != "classification":
        raise ConfigError(f"{key}: {section.strategy} is for classification data, not {task}")
    if section.strategy == "ewc" and strategy not in PENALISED:
        raise ConfigError(f"{key}: ewc reads whole parameters: it runs under single or ddp, not {strategy}")
    if section.strategy == "ewc" and quantization_aware:
        raise ConfigError(f"{key}: ewc estimates its Fisher on the plain model, not under training.quantization_aware")
    if section.strategy == "lwf" and (init_from is None or Path(init_from).is_file()):
        raise ConfigError(f"{key}: lwf learns from the run it starts from: give training.init_from a run directory")
    if section.strategy == "lwf" and not 0 <= section.lwf_weight <= 1:
        raise ConfigError(f"training.continual.lwf_weight: {section.lwf_weight} is not between 0 and 1")


def lwf_loss(section: ContinualSection, init_from: str) -> ComponentSpec:
    """The distillation loss that `lwf` trains with: the run it starts from as the teacher."""
    params = {"teacher": init_from, "temperature": section.lwf_temperature, "soft_weight": section.lwf_weight}
    return ComponentSpec("distillation", params)


class EWCLoss(nn.Module):
    """The training loss plus `lam / 2 * sum(F * (w - w*)^2)` over `model`'s parameters that have a Fisher."""

    def __init__(self, loss: nn.Module, model: nn.Module, earlier: dict[str, torch.Tensor], lam: float) -> None:
        super().__init__()
        self.loss, self.lam = loss, lam
        self.terms = []
        for name, parameter in model.named_parameters():
            fisher, anchor = earlier.get(f"fisher.{name}"), earlier.get(f"anchor.{name}")
            if fisher is None or anchor is None:
                continue
            if fisher.shape != parameter.shape or anchor.shape != parameter.shape:
                raise ConfigError(
                    f"training.init_from: its EWC state of {name} is {tuple(fisher.shape)}, the model's "
                    f"{tuple(parameter.shape)}"
                )
            device = parameter.device
            self.terms.append((parameter, fisher.to(device, parameter.dtype), anchor.to(device, parameter.dtype)))
        if not self.terms:
            raise ConfigError("training.init_from: its EWC state names none of this model's parameters")

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        penalty = sum((fisher * (parameter - anchor).pow(2)).sum() for parameter, fisher, anchor in self.terms)
        return self.loss(*args) + self.lam / 2 * penalty


def fisher_information(
    model: nn.Module, dataset: Dataset, loss: nn.Module, samples: int, seed: int, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher information of `model` on up to `samples` of `dataset` (drawn with `seed`): each
    parameter's squared gradient of the mean loss over a mini-batch, averaged over the mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:samples]  # type: ignore[arg-type]
    fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    model.eval()
    for indices in order.split(batch_size):
        inputs, targets = gather(dataset, indices)
        model.zero_grad(set_to_none=True)
        loss(model(inputs.cpu()), targets.cpu()).backward()
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and name in fisher:  # each batch weighed by its samples
                fisher[name] += parameter.grad.detach().pow(2) * len(indices) / len(order)
    return fisher


def ewc_state(
    model: nn.Module,
    dataset: Dataset,
    loss: nn.Module,
    section: ContinualSection,
    seed: int,
    earlier: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """What `final/ewc.safetensors` keeps: the Fisher of every task so far (the earlier ones' summed with this
    one's) and the weights it anchors to (this run's final ones)."""
    fisher = fisher_information(model, dataset, loss, section.fisher_samples, seed)
    state = {}
    for name, parameter in model.named_parameters():
        if name in fisher:
            before = (earlier or {}).get(f"fisher.{name}")
            total = fisher[name] + before if before is not None and before.shape == fisher[name].shape else fisher[name]
            state[f"fisher.{name}"] = total.detach().cpu().contiguous()
            state[f"anchor.{name}"] = parameter.detach().cpu().clone().contiguous()
    return state
