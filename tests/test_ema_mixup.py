"""The training recipe of issue 31: an EMA of the weights (recog/ema.py, timm's ModelEmaV3), mixup/cutmix with soft
targets (recog/mixing.py, torchvision v2) and the augment=photo preset (recog/data/photo.py).

The EMA equals a hand-computed one; it is checkpointed and exported with --ema; mixed targets are probabilities and
the loss on them is a hand-written soft cross-entropy; each refusal is one sentence; photo augmentation runs on real
images and is deterministic under a seed; and a real 2-process run with EMA, mixup and cutmix on, resumed from a
mid-epoch checkpoint, ends bit for bit where an uninterrupted run ends, the EMA weights included."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_train, tiny_args
from identify_setup import fashion_test_images, random_checkpoint

from recog.checkpoint import load_checkpoint, save_checkpoint
from recog.config import check_config, settle_classifier
from recog.data.decode import CropWhileDecoding, crop_while_decoding, decode_image
from recog.data.loader import Batch
from recog.data.normalize import Normalize
from recog.data.photo import photo_train
from recog.ema import WeightsEma
from recog.errors import ConfigError
from recog.export import Embedder, export, rebuild_model
from recog.export import main as export_main
from recog.exported import ExportedEmbedder
from recog.loss import RecognitionLoss
from recog.mixing import Mixing
from recog.model import Output, RecognitionModel
from recog.rundir import compose_train_config
from recog.step import StepRecipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fashion_images(tmp_path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images: the first `count` of the bundled Fashion-MNIST test set, uint8 1×28×28, and their labels."""
    pairs = fashion_test_images(tmp_path / "png", count)
    return torch.stack([decode_image(path.read_bytes(), 1) for path, _ in pairs]), torch.tensor([y for _, y in pairs])


def small_recipe(ema: WeightsEma | None = None, mixing: Mixing | None = None, seed: int = 0) -> StepRecipe:
    torch.manual_seed(seed)
    model = RecognitionModel("convnet", num_classes=10, in_channels=1, embedding_dim=8, width=4, blocks=(1, 1, 1))
    loss = RecognitionLoss(label_smoothing=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return StepRecipe(model, optimizer, loss, Normalize([0.3], [0.35]), ema=ema, mixing=mixing)


@pytest.mark.parametrize("every", [1, 2])
def test_the_ema_is_the_hand_computed_average_of_the_weights_and_their_batchnorm_statistics(tmp_path, every):
    images, labels = fashion_images(tmp_path, 64)
    recipe = small_recipe()
    recipe.ema = WeightsEma(recipe.model, decay=0.8, every=every)
    expected, updates = None, 0
    for step in range(6):
        part = slice(16 * (step % 4), 16 * (step % 4 + 1))
        recipe.step(Batch(images[part], labels[part], 0))
        if (step + 1) % every:
            continue
        now = {k: v.clone() for k, v in recipe.model.state_dict().items()}
        updates += 1
        if expected is None:  # the first update: a copy of the weights (ModelEmaV3's decay is 0 then)
            expected = now
        else:
            expected = {k: 0.8 * expected[k] + 0.2 * now[k] if now[k].is_floating_point() else now[k] for k in now}
    assert updates == 6 // every
    got = recipe.ema.module.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key
    # BatchNorm's running statistics are averaged too, its batch count copied; and the average is not the weights
    assert any("running_mean" in k for k in got) and torch.equal(got["backbone.0.1.num_batches_tracked"],
                                                                 recipe.model.state_dict()[
                                                                     "backbone.0.1.num_batches_tracked"])
    assert not torch.equal(got["embed.weight"], recipe.model.embed.weight)
    # in the recipe's state (what a checkpoint holds), and put back from it
    state = recipe.state_dict()
    other = small_recipe(seed=1)
    other.ema = WeightsEma(other.model, decay=0.8, every=every)
    other.load_state_dict(state)
    assert all(torch.equal(v, other.ema.module.state_dict()[k]) for k, v in got.items())


def test_export_with_ema_writes_the_averaged_weights_and_a_checkpoint_without_them_is_one_sentence(tmp_path, tiny_data):
    raw = random_checkpoint(tmp_path / "last.pt", f"data.train={tiny_data['train']}")
    ckpt = load_checkpoint(tmp_path / "last.pt")
    averaged = random_checkpoint(tmp_path / "other.pt", f"data.train={tiny_data['train']}", seed=1)
    with pytest.raises(ConfigError, match=r"holds no EMA weights \(its run trained with ema.decay=0\); export it "
                                          r"without --ema, or train with ema.decay above 0\.$"):
        export(tmp_path / "last.pt", tmp_path / "refused", onnx=False, ema=True)
    assert export_main([str(tmp_path / "last.pt"), str(tmp_path / "refused"), "--ema"]) == 2  # the command: the same
    assert not (tmp_path / "refused").exists()
    save_checkpoint({**ckpt, "ema": averaged.state_dict()}, tmp_path / "with_ema.pt")

    info = export(tmp_path / "with_ema.pt", tmp_path / "ema", onnx=False, ema=True)
    plain = export(tmp_path / "with_ema.pt", tmp_path / "raw", onnx=False)
    written = json.loads((tmp_path / "ema" / "model.json").read_text())
    assert written["weights"] == "ema" and "weights" not in plain
    assert written["checkpoint"]["file_sha256"] == plain["checkpoint"]["sha256"] != written["checkpoint"]["sha256"]
    assert info["checkpoint"]["sha256"] == written["checkpoint"]["sha256"]

    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = torch.export.load(tmp_path / "ema" / "embedder.pt2").module()(images)
        from_ema = Embedder(averaged, info["mean"], info["std"]).eval()(images)
        from_raw = Embedder(raw, info["mean"], info["std"]).eval()(images)
    assert torch.allclose(exported, from_ema, atol=1e-5)
    reader = ExportedEmbedder(tmp_path / "ema")  # what embed, index and serve read
    assert reader.sha256 == info["checkpoint"]["sha256"]
    assert not torch.allclose(exported, from_raw, atol=1e-2)
    assert torch.equal(rebuild_model({**ckpt, "model": averaged.state_dict()}, "x").embed.weight,
                       averaged.embed.weight)


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_are_probabilities_drawn_from_the_step_alone_and_the_loss_is_soft_cross_entropy(
        tmp_path, alphas):
    images, labels = fashion_images(tmp_path, 32)
    x = Normalize([0.3], [0.35])(images)
    mixing = Mixing(10, *alphas, seed=3)
    before = torch.get_rng_state()
    mixed, targets = mixing(x, labels, step=7, micro_batch=1)
    assert torch.equal(torch.get_rng_state(), before)  # the run's own randomness untouched
    assert targets.shape == (32, 10) and (targets >= 0).all()
    assert torch.allclose(targets.sum(1), torch.ones(32))
    assert ((targets > 0).sum(1) <= 2).all()  # each image: its own class and its partner's
    assert targets[torch.arange(32), labels].gt(0).all() and not torch.equal(mixed, x)
    again = mixing(x, labels, step=7, micro_batch=1)  # the same step and micro-batch: the same draws
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)
    others = [mixing(x, labels, step=s, micro_batch=m)[1] for s, m in ((8, 1), (7, 0))]
    assert not any(torch.equal(t, targets) for t in others)
    # the same global micro-batch on another rank's layout mixes alike
    shifted = Mixing(10, *alphas, seed=3, first_micro_batch=1)(x, labels, step=7, micro_batch=0)
    assert torch.equal(shifted[1], targets)

    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    loss = RecognitionLoss(label_smoothing=0.1)
    got = loss(Output(F.normalize(torch.randn(32, 8), dim=1), logits), targets)["total"]
    smoothed = targets * 0.9 + 0.1 / 10
    hand = -(smoothed * torch.log_softmax(logits, dim=1)).sum(1).mean()
    assert torch.allclose(got, hand, atol=1e-6)
    # one-hot targets: the same as the class indices
    one_hot = F.one_hot(labels, 10).float()
    assert torch.allclose(loss(Output(logits, logits), one_hot)["total"], loss(Output(logits, logits), labels)["total"])


def test_a_recipe_with_mixing_trains_on_soft_targets(tmp_path):
    images, labels = fashion_images(tmp_path, 32)
    plain, mixed = small_recipe(), small_recipe(mixing=Mixing(10, 0.8, 1.0))
    for recipe in (plain, mixed):
        recipe.step(Batch(images, labels, 0))
    assert not torch.equal(plain.model.embed.weight, mixed.model.embed.weight)


@pytest.mark.parametrize("overrides, sentence", [
    (["mixup.alpha=0.2", "loss.arc_margin=0.3"], "loss.arc_margin=0.3 puts ArcFace's margin on a single target class; "
     "set loss.arc_margin=0, or turn mixup off (mixup.alpha=0 mixup.cutmix_alpha=0)."),
    (["mixup.cutmix_alpha=1.0", "sampler=pk"], "use sampler=stream, or turn mixup off"),
    (["mixup.alpha=0.2", "loss=ce_triplet"], "needs one class per image; use loss=ce, or turn mixup off"),
    (["mixup.alpha=0.2", "loss=ce_multisimilarity"], "needs one class per image"),
    (["mixup.alpha=0.2", "loss=ce_proxyanchor"], "needs one class per image"),
    (["mixup.alpha=0.2", "model.classifier=sharded"], "set mixup.alpha=0 and mixup.cutmix_alpha=0 with "
     "model.classifier=sharded, or use model.classifier=replicated."),
    (["ema.decay=0.999", "model.classifier=sharded"], "ema.decay=0.999 averages the model's weights, and a sharded "
     "classifier's rows live in the loss, outside the average; set ema.decay=0 with model.classifier=sharded"),
    (["ema.decay=1.0"], "ema.decay=1.0 is not valid; give a number from 0 to 1 (below 1; 0: off)."),
    (["ema.every=0"], "ema.every=0 is not valid; give a whole number at least 1."),
    (["mixup.prob=1.5"], "mixup.prob=1.5 is not valid; give a number from 0 to 1."),
    (["mixup.alpha=-1"], "mixup.alpha=-1 is not valid"),
    (["augment=photo", "augment.auto_augment=auto"], "augment.auto_augment=auto is unknown; use trivial"),
    (["augment=photo", "augment.erase=2"], "augment.erase=2 is a probability"),
])
def test_what_the_recipe_cannot_train_is_refused_in_one_sentence(tiny_data, overrides, sentence):
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}", *overrides)
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    message = str(refused.value)
    assert sentence in message and message.count(". ") == 0 and message.endswith("."), message


def test_model_classifier_auto_trains_replicated_with_the_recipe_and_says_why(tiny_data):
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}",
                               "model.classifier=auto", "ema.decay=0.99")
    check_config(cfg)
    line = settle_classifier(cfg, 200_000)
    assert cfg.model.classifier == "replicated" and "ema.decay=0.99 averages the model's weights" in line


@pytest.mark.parametrize("auto_augment", ["trivial", "rand", "none"])
def test_photo_augmentation_runs_on_real_images_and_repeats_under_a_seed(tmp_path, auto_augment):
    grey, _ = fashion_images(tmp_path, 8)
    photos = F.interpolate(grey.float(), size=(72, 60), mode="bilinear").round().to(torch.uint8)
    for images in (photos, photos.expand(-1, 3, -1, -1).contiguous()):  # grey and RGB
        transform = photo_train(48, flip=0.5, auto_augment=auto_augment, erase=0.5)

        def run(seed, transform=transform, images=images):
            torch.manual_seed(seed)
            return [transform(image) for image in images]

        first, again, other = run(0), run(0), run(1)
        assert all(out.dtype == torch.uint8 and out.shape == (images.shape[1], 48, 48) for out in first)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # its leading crop is still done while decoding (data.jpeg_scaled_decode)
    decode, rest = crop_while_decoding(photo_train(48, auto_augment=auto_augment, erase=0.25))
    assert isinstance(decode, CropWhileDecoding) and len(rest.transforms) == 1 + (auto_augment != "none") + 1


@pytest.mark.slow
def test_ema_mixup_and_cutmix_resume_bit_exactly_on_two_processes(tiny_data, tmp_path):
    """2 processes, 2 epochs of 8 steps, EMA + mixup + cutmix: a run resumed from the uninterrupted run's checkpoint
    of step 10 (2 steps into epoch 2) ends with its model, EMA, optimizer state and evaluations, bit for bit."""
    args = tiny_args(tiny_data, epochs=2, batch_size=64, **{
        "model.width": 8, "checkpoint.every_steps": 2, "checkpoint.keep": 20,
        "ema.decay": 0.9, "mixup.alpha": 0.8, "mixup.cutmix_alpha": 1.0})
    whole = run_train(args + [f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "mixing each micro-batch: mixup alpha 0.8 or cutmix alpha 1 (0.5 / 0.5)" in whole.stdout
    assert "EMA of the weights: decay 0.9, every 1 step(s)" in whole.stdout and "(EMA 0." in whole.stdout

    resumed = run_train(args + [f"resume={tmp_path / 'whole' / 'checkpoints' / 'step-000000010.pt'}",
                                f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "step 10, 1 epoch(s) done and 2 of 8" in resumed.stdout
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 16
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert not torch.equal(a["ema"]["embed.weight"], a["model"]["embed.weight"])
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k]))
                   for k, v in state.items())
    whole_metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed_metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert whole_metrics["top1_ema"] == resumed_metrics["top1_ema"] and whole_metrics["top1"] == resumed_metrics["top1"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "whole" / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("eval/top1_ema")][-1] == pytest.approx(whole_metrics["top1_ema"])
