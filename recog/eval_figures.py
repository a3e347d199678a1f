"""Evaluation's figures: top-1, top-5, per class, the confusion matrix; and how one evaluation is reported.

`Tally` counts, on each rank, the test images seen, right at top-1 and within the top 5, and, given the number of
classes, the same per class (O(classes)) and, up to `confusion_classes` classes, the confusion matrix
(O(classes²)); `reduce` sums them over the ranks in one all-reduce. `report_evaluation` writes one evaluation to
TensorBoard (and whatever the writer fans out to) under a tag suffix ("eval/top1", "eval/top1_ema"), and returns
the worst classes for the log.
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


class Tally:
    """One evaluation's counts on this rank: the images seen, right at top-1 and (`top5`) within the top 5; with
    `num_classes`, per class the images seen and right, and the confusion matrix (rows: the true class, columns:
    the predicted one) for up to `confusion_classes` classes."""

    def __init__(self, device: torch.device, num_classes: int = 0, confusion_classes: int = 100, top5: bool = True):
        self.device, self.num_classes, self.top5 = device, num_classes, top5
        self.totals = torch.zeros(3, dtype=torch.int64, device=device)  # [right, seen, right within the top 5]
        self.per_class = torch.zeros(2, num_classes, dtype=torch.int64, device=device)  # [right, seen]
        self.confusion = (torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
                          if 0 < num_classes <= confusion_classes else None)
        if num_classes > confusion_classes:
            say_once(f"confusion matrix: {num_classes} classes, above eval.confusion_classes={confusion_classes}: "
                     "not drawn (per-class top-1 is still counted)")

    def add(self, labels: torch.Tensor, predicted: torch.Tensor, top: torch.Tensor | None = None) -> None:
        """`predicted`: each image's class; `top`: its top 5 (or fewer) classes, with top5."""
        right = predicted == labels
        within = (top == labels[:, None]).any(dim=1).sum() if top is not None else torch.zeros_like(self.totals[0])
        self.totals += torch.stack([right.sum(), torch.tensor(len(labels), device=self.device), within])
        n = self.num_classes
        if n:
            self.per_class[0] += torch.bincount(labels[right], minlength=n)
            self.per_class[1] += torch.bincount(labels, minlength=n)
        if self.confusion is not None:
            self.confusion += torch.bincount(labels * n + predicted, minlength=n * n)

    def reduce(self) -> dict:
        """Summed over the ranks (every rank calls it): top1, seen, top5 (None without), and with num_classes
        class_correct, class_seen, confusion (None above confusion_classes)."""
        parts = [self.totals, self.per_class.flatten()] + ([self.confusion] if self.confusion is not None else [])
        total, n = dist.all_reduce_sum(torch.cat(parts)).cpu(), self.num_classes
        right, seen, within = total[:3].tolist()
        figures = {"top1": right / max(seen, 1), "seen": seen, "top5": within / max(seen, 1) if self.top5 else None}
        if n:
            figures.update(class_correct=total[3:3 + n], class_seen=total[3 + n:3 + 2 * n],
                           confusion=total[3 + 2 * n:].view(n, n) if self.confusion is not None else None)
        return figures


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
