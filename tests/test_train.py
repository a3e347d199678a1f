"""train.py end to end, for real: torchrun with 2 gloo processes, plain python, resume, bad input."""

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from conftest import recog_frames, run_train, tiny_args, tiny_split
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data import corrupt_copy

from recog.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def read_scalars(tb_dir):
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_two_processes_under_torchrun(tiny_data, tmp_path):
    result = run_train(tiny_args(tiny_data, epochs=2), cwd=tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1, runs  # both ranks agreed on one run directory
    run = runs[0]
    assert result.stdout.count("config:") == 1  # printed once, by rank 0
    assert "per-rank batch 32, global batch 64 | 16 steps per epoch" in result.stdout  # ceil(ceil(1000/2)/32)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["step"] == 32 and metrics["world_size"] == 2
    assert metrics["eval_samples"] == 301  # each test image counted once across the 2 ranks (padding would give 302)
    assert 0.3 < metrics["top1"] <= 1.0 and metrics["images_per_s"] > 0

    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "step", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 32 and ckpt["config"]["batch_size"] == 32
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt", "step-000000016.pt",
                                                                       "step-000000032.pt"]
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]

    scalars = read_scalars(run / "tb")
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_frac", "train/startup_s", "eval/top1"):
        assert tag in scalars, sorted(scalars)
    assert len(scalars["train/loss"]) == 6  # steps 5, 10, ..., 30
    assert scalars["eval/top1"][-1] == pytest.approx(metrics["top1"])
    assert all(0 <= f <= 1 for f in scalars["train/data_wait_frac"])
    hparams = EventAccumulator(str(run / "tb"))
    hparams.Reload()
    assert "_hparams_/session_start_info" in hparams.PluginTagToContent("hparams")  # the hparams dashboard


def test_resume_trains_only_the_rest_and_ends_where_an_uninterrupted_run_ends(tiny_data, tmp_path):
    whole = run_train(tiny_args(tiny_data, epochs=2) + [f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path,
                      nproc=None)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["step"] == 64  # 2 x ceil(1000 / 32)

    # continue from the whole run's first-epoch checkpoint: only epoch 2 is trained ...
    resumed = run_train(tiny_args(tiny_data, epochs=2) + [
        f"resume={tmp_path / 'whole' / 'checkpoints' / 'step-000000032.pt'}", f"hydra.run.dir={tmp_path / 'resumed'}"],
        cwd=tmp_path, nproc=None)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "step-000000032.pt: step 32, 1 epoch(s) done\n" in resumed.stdout
    assert "epoch 2/2" in resumed.stdout and "epoch 1/2" not in resumed.stdout
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["step"] == 64
    # ... and it ends with the same weights and optimizer state: model, optimizer, LR schedule and data
    # order were all restored (drop any of them and the weights differ)
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 64


def test_resuming_with_a_larger_global_batch_continues_the_lr_schedule(tmp_path):
    """2 epochs of batch 8, then the same run directory with global_batch=32 and 4 epochs: the checkpoint's step
    (16) counts steps of 8 images, the new schedule has 2 steps of 32 per epoch (8 in all). The LR must go on from
    2 epochs in (step 4 of 8), not sit at 0 past the end of the schedule. Read from the run's TensorBoard events."""
    from recog.step import warmup_cosine

    data = {"train": tmp_path / "train", "test": tmp_path / "test"}
    tiny_split(data["train"], "train", 64, 32)
    tiny_split(data["test"], "test", 32, 32)
    run = tmp_path / "run"
    first = run_train(tiny_args(data, epochs=2, batch_size=8, log_every=1) + [f"hydra.run.dir={run}"], cwd=tmp_path,
                      nproc=None)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_train(tiny_args(data, epochs=4, batch_size=8, log_every=1, global_batch=32) + [f"hydra.run.dir={run}"],
                       cwd=tmp_path, nproc=None)
    assert second.returncode == 0, second.stdout + second.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 20 and metrics["global_batch"] == 32

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert sorted(lr) == list(range(1, 21))  # every step of both runs, once
    resumed = [lr[step] for step in range(17, 21)]  # the LR each step after the resume trained with
    want = [metrics["lr"] * warmup_cosine(s, warmup_steps=2, total_steps=8) for s in range(4, 8)]
    assert all(value > 0 for value in resumed), lr
    assert resumed == pytest.approx(want, rel=1e-5)
    assert "global batch changed from 8 to 32: the LR schedule continues at its step 4" in second.stdout


def test_training_starts_from_a_weights_file(tiny_data, tmp_path):
    """Under torchrun; that only rank 0 reads the file is tested in test_dist.py (run_on_rank0)."""
    weights = tmp_path / "init.pt"
    from recog.model import RecognitionModel

    torch.manual_seed(123)
    torch.save(RecognitionModel("convnet", 10, 1, width=16).state_dict(), weights)
    result = run_train(tiny_args(tiny_data, epochs=1) + [f"weights={weights}", "optim.lr=0.0",
                                                         f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    start = torch.load(weights, weights_only=True)
    # with lr 0 the weights cannot move: the run started from the file (BN statistics do move)
    assert torch.equal(trained["backbone.0.0.weight"], start["backbone.0.0.weight"])
    assert torch.equal(trained["class_weights"], start["class_weights"])


def test_undecodable_image_is_skipped_and_logged(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data["train"], data / "train")
    corrupt_copy(tiny_data["train"] / "train-000001.tar", data / "train" / "train-000001.tar", {"000000400"})
    result = run_train(tiny_args(tiny_data, **{"data.train": data / "train"}) + [f"hydra.run.dir={tmp_path / 'r'}"],
                       cwd=tmp_path, nproc=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipping undecodable sample" in result.stdout + result.stderr
    assert "skipped 1 unreadable samples" in (tmp_path / "r" / "train.log").read_text()
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["skipped_samples"] == 1


@pytest.mark.parametrize("override,message", [
    ({"data.train": "/nonexistent/shards"}, "no shards at /nonexistent/shards"),
    ({"batch_size": 0}, "batch_size=0 is not valid"),
    ({"model.backbone": "resnet1000"}, "unknown model 'resnet1000'"),
    ({"data.train": "EMPTY"}, "lists no samples"),
])
def test_bad_input_stops_with_one_sentence(tiny_data, tmp_path, override, message):
    if override.get("data.train") == "EMPTY":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "manifest.json").write_text('{"shards": [], "classes": [], "class_counts": []}')
        override = {"data.train": tmp_path / "empty"}
    result = run_train(tiny_args(tiny_data, **override), cwd=tmp_path, nproc=2, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr  # one sentence, from rank 0 only
    # torchrun's agent prints its own ChildFailedError report; no traceback comes from recog's processes
    assert not recog_frames(result.stderr), result.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


def test_unknown_model_group_is_refused_by_hydra(tiny_data, tmp_path):
    result = run_train(tiny_args(tiny_data) + ["model=nope"], cwd=tmp_path, nproc=None)
    assert result.returncode != 0 and "Could not find 'model/nope'" in result.stderr


def test_own_rgb_images_from_a_folder(tmp_path):
    """The README's path for your own images: folder -> shards -> data=images."""
    from PIL import Image

    from recog.data.__main__ import main as data_cli

    for split, count in (("train", 24), ("test", 8)):
        for label, color in enumerate(((200, 30, 30), (30, 30, 200))):
            folder = tmp_path / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):  # noisy, like photos: no channel is constant (its std would be ~0)
                noise = np.random.default_rng(i + 100 * label).integers(-40, 40, (36, 40, 3))
                Image.fromarray((np.array(color) + noise).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
        assert data_cli(["write", "folder", str(tmp_path / "images" / split), str(tmp_path / "shards" / split),
                         "--shard-samples", "8"]) == 0
        # no flag: the folder is read class by class, yet the first shard holds both (shuffled by default)
        with tarfile.open(tmp_path / "shards" / split / "shard-000000.tar") as tar:
            labels = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
        assert labels == {b"0", b"1"}
    result = run_train(["data=images", f"data.train={tmp_path / 'shards/train'}",
                        f"data.test={tmp_path / 'shards/test'}", "data.image_size=32", "data.num_workers=1",
                        "epochs=2", "batch_size=8", "optim.lr=2.0", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, nproc=None)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_samples"] == 16 and metrics["top1"] >= 0.9  # red vs blue: easily separable


def test_missing_data_path_is_named(tmp_path):
    result = run_train(["data=images"], cwd=tmp_path, nproc=None)
    assert result.returncode == 2 and "data.train is not set" in result.stderr


def test_cross_entropy_plus_triplet_trains(tiny_data, tmp_path):
    result = run_train(tiny_args(tiny_data) + ["loss=ce_triplet", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                       nproc=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TripletMarginLoss" in result.stdout  # the composed config, printed once
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_loss"] > 0


def test_pk_retrieval_under_torchrun(tiny_data, tmp_path):
    """experiment=retrieval_fashion on tiny shards: P×K batches read by index, triplets mined across the two
    ranks, retrieval metrics, projector."""
    result = run_train(tiny_args(tiny_data, epochs=1) + ["experiment=retrieval_fashion", "sampler.p=3", "sampler.k=8",
                                                         "loss.cross_rank=true", "eval.projector=20",
                                                         "eval.gallery=train", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "per-rank batch 24, global batch 48 | 20 steps per epoch" in result.stdout  # 1000 // (2 x 3 x 8)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_samples"] == 301
    for name in ("recall@1", "recall@5", "recall@10", "map@r"):
        assert 0 < metrics[name] <= 1
    assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"]
    # eval.gallery=train: each rank searched its own test images against the 1,000 training images; one process
    # embedding both splits with the saved weights finds the same figures (up to near-ties: embeddings computed
    # in other batches differ in the last bits)
    want = one_process_retrieval(tmp_path / "run" / "checkpoints" / "last.pt", tiny_data)
    assert {k: metrics[k] for k in want} == pytest.approx(want, abs=2 / 301)
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["eval/recall@1"][-1] == pytest.approx(metrics["recall@1"])
    projector = list((tmp_path / "run" / "tb").rglob("projector_config.pbtxt"))
    assert projector and list((tmp_path / "run" / "tb").rglob("sprite.png"))  # embeddings with thumbnails


def test_a_proxy_loss_survives_a_killed_worker_bit_exactly(tiny_data, tmp_path):
    """loss=ce_proxyanchor under torchrun --max-restarts=1, rank 1 SIGKILLed in epoch 2: the restarted job resumes
    from a mid-epoch checkpoint and ends with the model, the proxies and both optimizer groups' state of an
    uninterrupted run, bit for bit."""
    import os
    import signal

    from test_failures import finish, start, wait_for, worker_pid

    args = tiny_args(tiny_data, epochs=2, batch_size=64, **{"loss": "ce_proxyanchor", "model.width": 8,
                                                             "checkpoint.every_steps": 2, "checkpoint.keep": 20})
    whole = run_train(args + [f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "(the loss's 1280 parameters: x 100)" in whole.stdout  # 10 proxies of 128

    (tmp_path / "killed").mkdir()
    proc = start(args, tmp_path / "killed", ["--max-restarts=1"])
    wait_for(tmp_path / "killed" / "outputs", "step-000000010.pt", proc)  # epoch 2 (of 8 steps), 2 steps in
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 0 and "resumed from" in out, out
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(next((tmp_path / "killed" / "outputs").iterdir()) / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 16
    assert list(a["loss"]) == ["metric.proxies"] and "metric.proxies" not in a["model"]
    assert torch.equal(a["loss"]["metric.proxies"], b["loss"]["metric.proxies"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, state in a["optimizer"]["state"].items():  # the proxies' optimizer state is the last entry
        assert state.keys() == b["optimizer"]["state"][i].keys()
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k]))
                   for k, v in state.items())
    assert [g["lr_scale"] for g in b["optimizer"]["param_groups"]] == [1.0, 100.0]
    first = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-000000002.pt")
    assert not torch.equal(first["loss"]["metric.proxies"], a["loss"]["metric.proxies"])  # they trained


def one_process_retrieval(checkpoint, tiny_data) -> dict[str, float]:
    """Test images queried against the training images, embedded in this process from a checkpoint."""
    from recog.data.manifest import load_manifest
    from recog.data.stream import ShardStream
    from recog.export import Embedder, data_settings, read_checkpoint, rebuild_model
    from recog.retrieval import retrieval_metrics

    ckpt = read_checkpoint(checkpoint)
    settings = data_settings(ckpt["config"], checkpoint)
    embedder = Embedder(rebuild_model(ckpt, checkpoint), settings["mean"], settings["std"]).eval()

    def embed(split):
        stream = ShardStream(load_manifest(tiny_data[split]), rank=0, world_size=1, batch_size=64, train=False)
        with torch.no_grad():
            batches = [(embedder(b.images), b.labels) for b in stream]
        return torch.cat([e for e, _ in batches]), torch.cat([lab for _, lab in batches])

    return retrieval_metrics(*embed("test"), *embed("train"))
