r"""Fine-tuning beats scratch (issue 31): a timm model "pretrained" on some classes, fine-tuned by recog on others.

    .venv/bin/python bench/finetune.py --work /tmp/finetune      # --model resnet10t --seeds 0 1 2 --epochs 30

1. Pretraining, by a plain hand-written timm + PyTorch script (the weights a team would download): a timm model
   (3 input channels, as ImageNet weights have) trained on every Fashion-MNIST training image of classes 0-4
   (T-shirt, trouser, pullover, dress, coat; 30,000 images, grey repeated into RGB, normalised with the model's
   pretrained config's mean/std), then saved as a .safetensors file with its 5-class head, as a Hub file would be.
2. Fine-tuning, by recog (2 processes, train.py, model=timm with its defaults): the other five classes (sandal, shirt,
   sneaker, bag, ankle boot) with 100 training images and 200 test images each (seeded choices), from
   `model.pretrained=FILE` (grey images: timm sums the stem's RGB weights, in_chans=1; mean/std from the pretrained
   config) and from scratch (`model.pretrained=false`), for each seed; then from the weights again with EMA, and with
   mixup + cutmix.

It prints every run's top-1 and each row's mean and spread (max - min over the seeds), and whether the weights win by
more than the seeds' spread. The data are real 28-px Fashion-MNIST images: no RGB photo set can be obtained here.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
PRETRAIN_CLASSES, FINETUNE_CLASSES = range(0, 5), range(5, 10)


def read_split(kind: str) -> tuple[np.ndarray, np.ndarray]:
    from recog.data.idx import read_idx

    prefix = "train" if kind == "train" else "t10k"
    return (read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz"),
            read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-format file: uint8 images, or uint8 labels."""
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                + array.astype(np.uint8).tobytes())


def finetune_data(work: Path, per_class: int, test_per_class: int) -> dict[str, Path]:
    """Shards of classes 5-9 (labelled 0-4, named): `per_class` training images and `test_per_class` test images
    of each (seeded choices)."""
    out = {}
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test_per_class)):
        folder = work / f"data-{per_class}-{test_per_class}" / split
        out[split] = folder
        if (folder / "manifest.json").exists():
            continue
        images, labels = read_split(split)
        chosen = []
        for c in FINETUNE_CLASSES:
            where = np.flatnonzero(labels == c)
            chosen.append(np.sort(rng.choice(where, min(count, len(where)), replace=False)))
        chosen = np.concatenate(chosen)
        raw = folder.parent / "idx"
        raw.mkdir(parents=True, exist_ok=True)
        write_idx(raw / f"{split}-images.gz", images[chosen])
        write_idx(raw / f"{split}-labels.gz", labels[chosen] - FINETUNE_CLASSES[0])
        subprocess.run([sys.executable, "-m", "recog.data", "write", "idx", str(raw / f"{split}-images.gz"),
                        str(raw / f"{split}-labels.gz"), str(folder), "--class-names",
                        ",".join(NAMES[c] for c in FINETUNE_CLASSES)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def pretrain(model_name: str, path: Path, epochs: int) -> str:
    """The plain script: timm's model, AdamW, a cosine LR, random 2-px shifts and flips; saved as safetensors."""
    import timm
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    images, labels = read_split("train")
    keep = np.isin(labels, list(PRETRAIN_CLASSES))
    x = torch.from_numpy(images[keep]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(labels[keep])
    model = timm.create_model(model_name, num_classes=len(PRETRAIN_CLASSES), in_chans=3)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    batch, steps = 128, epochs * (len(x) // 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            xb = x[idx]
            shift = torch.randint(-2, 3, (2,))
            xb = torch.roll(xb, (int(shift[0]), int(shift[1])), dims=(2, 3))
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model((xb.expand(-1, 3, -1, -1) - mean) / std), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    test_images, test_labels = read_split("test")
    keep = np.isin(test_labels, list(PRETRAIN_CLASSES))
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(test_images[keep]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
        predicted = torch.cat([model((xt[i:i + 500] - mean) / std).argmax(1) for i in range(0, len(xt), 500)])
    top1 = (predicted == torch.from_numpy(test_labels[keep])).float().mean().item()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return f"pretrained {model_name} on classes 0-4 ({len(x)} images, {epochs} epochs, {step} steps): " \
           f"top-1 {top1:.4f} on their test images"


def finetune(run_dir: Path, args: list[str], log: Path) -> dict:
    if (run_dir / "metrics.json").exists():
        return json.loads((run_dir / "metrics.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    with open(log, "w") as f:
        done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "train.py", *args,
                               f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"error: train.py failed (status {done.returncode}); see {log}")
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune"))
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (4 steps each: 500 images)")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=200, help="test images per class (1000 at most)")
    parser.add_argument("--set", nargs="*", default=[], help="more train.py overrides for every fine-tuning run")
    parser.add_argument("--tag", default="", help="a name for those overrides in the runs' folder names")
    parser.add_argument("--rows", nargs="+", default=["scratch", "pretrained", "pretrained+ema", "pretrained+mixup"])
    options = parser.parse_args()
    require("timm", "safetensors", extra="timm")
    work = options.work
    work.mkdir(parents=True, exist_ok=True)
    weights = work / f"{options.model}-classes0-4.safetensors"
    if not weights.exists():
        start = time.perf_counter()
        line = pretrain(options.model, weights, options.pretrain_epochs)
        (work / "pretrain.txt").write_text(line + "\n")
        print(f"{line} in {time.perf_counter() - start:.0f} s")
    else:
        print((work / "pretrain.txt").read_text().strip(), "(earlier run)")
    data = finetune_data(work, options.per_class, options.test_per_class)
    common = [f"data.train={data['train']}", f"data.test={data['test']}", "data.prepare=null", "data.image_size=28",
              "model=timm", f"model.backbone=timm:{options.model}", f"epochs={options.epochs}", "log_every=4",
              *options.set]
    rows = {"scratch": ["model.pretrained=false"], "pretrained": [f"model.pretrained={weights}"],
            "pretrained+ema": [f"model.pretrained={weights}", "ema.decay=0.99", "ema.warmup=true"],
            "pretrained+mixup": [f"model.pretrained={weights}", "mixup.alpha=0.2", "mixup.cutmix_alpha=1.0"]}
    results: dict[str, list[float]] = {}
    for name in options.rows:
        for seed in options.seeds:
            tag = f"{name}-{options.per_class}-{options.test_per_class}-e{options.epochs}{options.tag}-seed{seed}"
            run = work / "runs" / tag
            start = time.perf_counter()
            metrics = finetune(run, common + rows[name] + [f"seed={seed}"], work / f"{tag}.log")
            key = "top1_ema" if name.endswith("ema") and "top1_ema" in metrics else "top1"
            results.setdefault(name, []).append(metrics[key])
            print(f"{name} seed {seed}: top-1 {metrics[key]:.4f} ({key}; {time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(f"\n{options.model}, classes 5-9 of Fashion-MNIST, {options.per_class} training images per class, "
          f"{options.test_per_class} test images per class, {options.epochs} epochs, 2 processes, "
          f"seeds {options.seeds}")
    print("| start | " + " | ".join(f"seed {s}" for s in options.seeds) + " | mean | spread |")
    print("|---|" + "---|" * len(options.seeds) + "---|---|")
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {np.mean(values):.4f} | {max(values) - min(values):.4f} |")
    if "scratch" in results and "pretrained" in results:
        margin = np.mean(results["pretrained"]) - np.mean(results["scratch"])
        spread = max(max(v) - min(v) for k, v in results.items() if k in ("scratch", "pretrained"))
        verdict = "wins" if margin > spread else "does NOT win"
        print(f"from the weights {verdict}: mean margin {margin:+.4f} against the seeds' largest spread {spread:.4f}")


if __name__ == "__main__":
    main()
