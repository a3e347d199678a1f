"""Evaluation's figures beyond top-1, and how one evaluation is reported.

`ClassTally` counts, on each rank, the test images seen and classified right per class (O(classes)) and, up to
`confusion_classes` classes, the confusion matrix (O(classes²)); `reduce` sums them over the ranks in one
all-reduce. `report_evaluation` writes one evaluation to TensorBoard (and whatever the writer fans out to) under
a tag suffix ("eval/top1", "eval/top1_ema"), and returns the worst classes for the log.
"""

from __future__ import annotations

import logging

import torch

from recog import dist

log = logging.getLogger("recog")

CELL_PIXELS = 256  # the confusion image is about this many pixels a side (at least a pixel a cell)
_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info("%s", message)


class ClassTally:
    """Per class: the test images seen and those classified right; the confusion matrix (rows: the true class,
    columns: the predicted one) only for up to `confusion_classes` classes."""

    def __init__(self, num_classes: int, device: torch.device, confusion_classes: int):
        self.num_classes = num_classes
        self.counts = torch.zeros(2, num_classes, dtype=torch.int64, device=device)  # [correct, seen]
        self.confusion = (torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
                          if num_classes <= confusion_classes else None)

    def add(self, labels: torch.Tensor, predicted: torch.Tensor) -> None:
        n = self.num_classes
        self.counts[0] += torch.bincount(labels[predicted == labels], minlength=n)
        self.counts[1] += torch.bincount(labels, minlength=n)
        if self.confusion is not None:
            self.confusion += torch.bincount(labels * n + predicted, minlength=n * n)

    def reduce(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(correct, seen) per class and the confusion matrix, summed over the ranks (every rank calls it)."""
        mine = self.counts.flatten() if self.confusion is None else torch.cat([self.counts.flatten(), self.confusion])
        total = dist.all_reduce_sum(mine).cpu()
        n = self.num_classes
        confusion = total[2 * n:].view(n, n) if self.confusion is not None else None
        return total[:n], total[n:2 * n], confusion


def worst_classes(correct: torch.Tensor, seen: torch.Tensor, classes: list[str], count: int) -> str:
    """The `count` classes with the lowest top-1 (of those with test images), worst first: `Shirt 0.612 (98)`."""
    present = (seen > 0).nonzero().flatten()
    if count <= 0 or len(present) < 2:
        return ""
    accuracy = correct[present].double() / seen[present].double()
    order = present[accuracy.argsort(stable=True)][:count].tolist()
    return ", ".join(f"{classes[i]} {correct[i].item() / seen[i].item():.3f} ({seen[i].item()})" for i in order)


def confusion_image(confusion: torch.Tensor) -> torch.Tensor:
    """The confusion matrix as an RGB image (3, H, W) in [0, 1]: each row (a true class) divided by its images,
    white at 0 to dark blue at 1, each cell a square of pixels; class i is row i and column i (data.classes order)."""
    n = confusion.shape[0]
    share = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    dark = torch.tensor([0.03, 0.19, 0.42], dtype=torch.float64).view(3, 1, 1)
    image = 1 - share.unsqueeze(0) * (1 - dark)  # (3, n, n)
    pixels = max(1, CELL_PIXELS // n)
    return image.repeat_interleave(pixels, dim=1).repeat_interleave(pixels, dim=2).float()


def report_evaluation(writer, result, step: int, classes: list[str], suffix: str = "",
                      per_class_scalars: int = 20, worst: int = 5) -> str:
    """One evaluation in TensorBoard under `suffix` (eval/top1{suffix}, eval/top5{suffix}, the retrieval metrics,
    per-class top-1 for up to `per_class_scalars` classes, the confusion matrix image); returns its worst classes
    for the log line ("" when there is nothing to say)."""
    writer.add_scalar(f"eval/top1{suffix}", result.top1, step)
    if result.top5 is not None:
        writer.add_scalar(f"eval/top5{suffix}", result.top5, step)
    for name, value in result.retrieval.items():
        writer.add_scalar(f"eval/{name}{suffix}", value, step)
    if result.class_seen is None:
        return ""
    correct, seen = result.class_correct, result.class_seen
    if len(classes) <= per_class_scalars:
        for i, name in enumerate(classes):
            if seen[i]:
                writer.add_scalar(f"eval_class/{name}{suffix}", correct[i].item() / seen[i].item(), step)
    else:
        say_once(f"per-class top-1 in TensorBoard: {len(classes)} classes, above eval.per_class_scalars="
                 f"{per_class_scalars}: left out (the worst classes are in the log)")
    if result.confusion is not None:
        writer.add_image(f"eval/confusion{suffix}", confusion_image(result.confusion), step)
    return worst_classes(correct, seen, classes, worst)
