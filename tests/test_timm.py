"""timm backbones (model.backbone=timm:NAME): pretrained weights from a local file with no network (the model's
first forward is timm's own for that file, the data line prints the pretrained config's mean/std), five families
each trained on 2 real processes then exported, embedded, indexed and identified, and the refusals (an unknown
name, a missing file, pretrained=true offline, a pickled file that would run code), each one sentence."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import recog_frames, run_train, tiny_split
from identify_setup import fashion_test_images, pickled
from omegaconf import OmegaConf

from recog import dist
from recog.checkpoint import load_checkpoint
from recog.config import check_config, settle_data_settings
from recog.data.manifest import load_manifests
from recog.errors import ConfigError
from recog.pretrained import build_model
from recog.rundir import compose_train_config, project_dir

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # nothing may reach the network: a download attempt fails at once

# The five families, their tiniest variants timm has, with what they need beside 28-px grey images: the ViT 7-px
# patches, the ConvNeXt 32 px (its 4x stem and three 2x downsamplings would leave less than one pixel of 28)
FAMILIES = {
    "resnet": ("test_resnet", {}, {}),
    "efficientnet": ("test_efficientnet", {}, {}),
    "convnext": ("test_convnext", {}, {"data.image_size": 32}),
    "mobilenetv3": ("mobilenetv3_small_050", {}, {}),
    "vit": ("test_vit", {"img_size": 28, "patch_size": 7}, {}),
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """64 training images (one step of a global batch of 64 on 2 processes) and 32 test images."""
    root = tmp_path_factory.mktemp("timm-data")
    tiny_split(root / "train", "train", 64, 64)
    tiny_split(root / "test", "test", 32, 32)
    return {"train": root / "train", "test": root / "test"}


def train_args(data: dict[str, Path], run_dir: Path, name: str, **more) -> list[str]:
    args = {"data.train": data["train"], "data.test": data["test"], "data.prepare": "null", "epochs": 1,
            "batch_size": 32, "data.num_workers": 0, "model": "timm", "model.backbone": f"timm:{name}",
            "model.embedding_dim": 32, "hydra.run.dir": run_dir, **more}
    return [f"{key}={value}" for key, value in args.items()]


def save_weights(name: str, path: Path, seed: int, **kwargs) -> Path:
    """A timm model's whole state dict (classifier included, as timm's own files have it) with random weights
    drawn from `seed`: "pretrained" weights that differ from what a run's seed would draw."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    for module in model.modules():  # running statistics that are not the identity, so eval mode tests them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
    if path.suffix == ".safetensors":
        safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def one_sentence(result, message: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 or (result.returncode == 1 and "exitcode  : 2" in result.stderr), \
        result.stderr[-3000:]
    assert errors and all(e == errors[0] for e in errors) and message in errors[0], result.stderr[-3000:]
    assert not recog_frames(result.stderr), result.stderr[-3000:]


def test_sync_bn_keeps_timms_activations_inside_its_norms():
    """perf.sync_bn on a timm backbone: timm's BatchNormAct2d (MobileNetV3, EfficientNet) holds its activation;
    torch's converter alone would make it a plain SyncBatchNorm that never calls it. Converted by timm's, the
    activation stays (SyncBatchNormAct), and a plain BatchNorm becomes torch's SyncBatchNorm."""
    from recog.parallel import prepare_sync_bn

    model = torch.nn.Sequential(timm.create_model("mobilenetv3_small_050", num_classes=0), torch.nn.BatchNorm1d(4))
    kinds = {type(m).__name__ for m in prepare_sync_bn(model).modules()}
    assert "SyncBatchNormAct" in kinds and "SyncBatchNorm" in kinds and "BatchNormAct2d" not in kinds, kinds


# --- offline pretrained weights: two families, from safetensors, no network ---

@pytest.mark.parametrize("name,channels", [("test_resnet", 1), ("test_convnext", 3)])
def test_a_weights_file_gives_timms_own_first_forward(small_data, tmp_path, name, channels):
    weights = save_weights(name, tmp_path / f"{name}.safetensors", seed=123)
    cfg = compose_train_config(*train_args(small_data, tmp_path / "run", name, **{
        "model.pretrained": weights, "data.channels": channels}))
    check_config(cfg)
    train = load_manifests(cfg.data.train, None)
    settings = settle_data_settings(cfg, train, None)
    expected = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    mean = [round(sum(expected["mean"]) / 3, 4)] if channels == 1 else list(expected["mean"])
    assert settings.mean == pytest.approx(mean) and settings.channels == channels
    assert f"from the pretrained config of timm:{name}" in settings.line
    settings.write_into(cfg)

    ctx = dist.Dist(0, 0, 1, 1, torch.device("cpu"), None)
    torch.manual_seed(cfg.seed)  # what train.py draws the run's model with
    model = build_model(cfg, ctx, num_classes=10).eval()
    reference = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)},
                                  num_classes=0, in_chans=channels).eval()
    assert model.backbone.num_features == reference.num_features  # the timm model itself, its head removed
    assert type(model.backbone) is type(reference) and model.backbone.group_matcher()  # what layer decay reads
    images = torch.randn(4, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.backbone(images), reference(images))
        torch.manual_seed(cfg.seed)
        scratch = build_model(cfg, ctx, num_classes=10, resuming=True).eval()  # a resume reads no weights
        assert not torch.allclose(scratch.backbone(images), reference(images))


@pytest.mark.slow  # train.py for two steps on one process
def test_training_from_a_weights_file_prints_the_pretrained_mean_and_std(small_data, tmp_path):
    weights = save_weights("test_efficientnet", tmp_path / "w.safetensors", seed=123)
    result = run_train(train_args(small_data, tmp_path / "run", "test_efficientnet", **{
        "model.pretrained": weights, "global_batch": 32}), cwd=tmp_path, nproc=None, extra_env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    data_line = next(line for line in result.stdout.splitlines() if "data: 1 channel(s)" in line)
    # test_efficientnet's pretrained config: ImageNet's mean/std, their mean for grey images; 28 px kept
    assert "28 px, mean [0.449], std [0.226]" in data_line, data_line
    assert "mean/std from the pretrained config of timm:test_efficientnet" in data_line
    assert "2 steps per epoch" in result.stdout
    config = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]  # what an export reads
    assert config["data"]["mean"] == [0.449] and config["model"]["pretrained"] == str(weights)


# --- five families on 2 processes: train a step, export, embed, index, identify ---

@pytest.mark.slow  # torchrun with 2 processes per family
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_trains_exports_embeds_and_identifies(small_data, tmp_path, family, capsys):
    faiss = pytest.importorskip("faiss")
    from recog.embed import run as embed
    from recog.export import export
    from recog.identify import main as identify
    from recog.index import build
    from recog.preempt import StopOnSignal

    name, kwargs, data_settings = FAMILIES[family]
    weights = save_weights(name, tmp_path / "w.safetensors", seed=7, **kwargs)
    overrides = {"model.pretrained": weights, **data_settings}
    if kwargs:
        overrides["model.timm_kwargs"] = "{" + ",".join(f"{k}:{v}" for k, v in kwargs.items()) + "}"
    result = run_train(train_args(small_data, tmp_path / "run", name, **overrides), cwd=tmp_path, nproc=2,
                       extra_env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout and "1 steps per epoch" in result.stdout

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        info = export(tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "export", onnx=False)
        assert info["embedding_dim"] == 32
        embed_cfg = OmegaConf.merge(OmegaConf.load(Path(project_dir()) / "conf" / "embed.yaml"), {
            "model": str(tmp_path / "export"), "data": str(small_data["train"]), "out": str(tmp_path / "emb"),
            "num_workers": 0, "part_size": 100})
        del embed_cfg["hydra"]
        assert embed(embed_cfg, StopOnSignal())["count"] == 64
        build(tmp_path / "emb", tmp_path / "index", log=lambda line: None)
        images = fashion_test_images(tmp_path / "images", 3)
        capsys.readouterr()
        assert identify(["--model", str(tmp_path / "export"), "--index", str(tmp_path / "index"), "-k", "3",
                         "--json", *[str(path) for path, _ in images]]) == 0
    finally:
        faiss.omp_set_num_threads(threads)
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 3 and all(len(a["matches"]) == 3 for a in answers)


# --- refusals, each one sentence ---

def test_an_unknown_timm_name_is_one_sentence_before_any_process_group(small_data, tmp_path):
    result = run_train(train_args(small_data, tmp_path / "run", "no_such_net"), cwd=tmp_path, nproc=None)
    one_sentence(result, "timm has no model 'no_such_net'; list the names it has with")
    assert "timm.list_models('*no*')" in result.stderr
    assert not (tmp_path / "run" / "train.log").exists()  # stopped before the run directory was taken


@pytest.mark.parametrize("override,message", [
    ({"model.pretrained": "weights.npz"}, "is neither true/false, a weights file"),
    ({"model.small_input": True}, "model.small_input=true is for torchvision ResNets"),
])
def test_settings_timm_cannot_take_are_refused_by_check_config(small_data, tmp_path, override, message):
    cfg = compose_train_config(*train_args(small_data, tmp_path, "test_resnet"), *[
        f"+{k}={v}" if k == "model.small_input" else f"{k}={v}" for k, v in override.items()])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(cfg)
    with pytest.raises(ConfigError, match="model.pretrained is for timm backbones"):
        check_config(compose_train_config(*train_args(small_data, tmp_path, "x")[:4], "model=resnet18",
                                          "+model.pretrained=true"))


@pytest.mark.slow  # torchrun with 2 processes
def test_a_missing_weights_file_is_one_sentence_on_every_rank(small_data, tmp_path):
    result = run_train(train_args(small_data, tmp_path / "run", "test_resnet", **{
        "model.pretrained": tmp_path / "gone.safetensors"}), cwd=tmp_path, nproc=2, extra_env=OFFLINE)
    one_sentence(result, f"model.pretrained={tmp_path / 'gone.safetensors'}: no such file; give the path")


def test_pretrained_true_offline_is_one_sentence_naming_the_fix(small_data, tmp_path):
    result = run_train(train_args(small_data, tmp_path / "run", "test_resnet", **{"model.pretrained": "true"}),
                       cwd=tmp_path, nproc=None, extra_env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")})
    one_sentence(result, "could not download timm's default weights for test_resnet and no copy is cached")
    assert "model.pretrained=/path/to/file.safetensors" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr


def test_a_hub_id_offline_is_one_sentence(small_data, tmp_path, monkeypatch):
    from huggingface_hub import constants  # read from the environment at its import: set here, in this process

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # an empty cache
    cfg = compose_train_config(*train_args(small_data, tmp_path, "test_resnet", **{
        "model.pretrained": "hf-hub:timm/test_resnet.r160_in1k", "data.channels": 1}))
    check_config(cfg)
    with pytest.raises(ConfigError, match="could not download Hub id timm/test_resnet.r160_in1k"):
        build_model(cfg, dist.Dist(0, 0, 1, 1, torch.device("cpu"), None), num_classes=10)


def test_a_pickled_weights_file_that_would_run_code_is_refused_unrun(small_data, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evil.pth").write_bytes(pickled(marker))
    cfg = compose_train_config(*train_args(small_data, tmp_path, "test_resnet", **{
        "model.pretrained": tmp_path / "evil.pth", "data.channels": 1}))
    with pytest.raises(ConfigError, match="cannot be loaded into timm model test_resnet"):
        build_model(cfg, dist.Dist(0, 0, 1, 1, torch.device("cpu"), None), num_classes=10)
    assert not marker.exists()
    # a plain state dict in a .pth file is read (weights_only=True) like a safetensors file
    plain = save_weights("test_resnet", tmp_path / "plain.pth", seed=5)
    cfg.model.pretrained = str(plain)
    model = build_model(cfg, dist.Dist(0, 0, 1, 1, torch.device("cpu"), None), num_classes=10)
    reference = timm.create_model("test_resnet", pretrained=True, pretrained_cfg_overlay={"file": str(plain)},
                                  num_classes=0, in_chans=1)
    assert torch.equal(model.backbone.state_dict()["conv1.0.weight"], reference.state_dict()["conv1.0.weight"])


@pytest.mark.slow  # train.py three times on one process
def test_a_resume_needs_no_weights_file_and_ends_bit_identical(small_data, tmp_path):
    """2 epochs in one go, against 1 epoch, the weights file deleted, then a restart to 2 epochs: the restart reads
    the checkpoint, not the file, and ends with the same weights bit for bit."""
    weights = save_weights("test_resnet", tmp_path / "w.safetensors", seed=123)
    args = {"model.pretrained": weights, "global_batch": 32}
    whole = run_train(train_args(small_data, tmp_path / "whole", "test_resnet", **args, epochs=2), cwd=tmp_path,
                      nproc=None, extra_env=OFFLINE)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run_train(train_args(small_data, tmp_path / "split", "test_resnet", **args, epochs=1), cwd=tmp_path,
                      nproc=None, extra_env=OFFLINE)
    assert first.returncode == 0, first.stderr[-3000:]
    weights.unlink()
    again = run_train(train_args(small_data, tmp_path / "split", "test_resnet", **args, epochs=2), cwd=tmp_path,
                      nproc=None, extra_env=OFFLINE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "Loading pretrained weights" not in again.stdout + again.stderr
    ends = [load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["model"] for run in ("whole", "split")]
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][key], ends[1][key]) for key in ends[0])


def test_without_timm_or_with_an_old_one_the_sentence_names_the_install(monkeypatch):
    from recog.backbones import import_timm
    from recog.model import check_backbone

    monkeypatch.setattr(timm, "__version__", "1.0.25")  # its readers unpickled weights files
    with pytest.raises(ConfigError, match=re.escape("timm 1.0.25 is installed and recog needs timm >= 1.0.26")):
        import_timm()
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # what `import timm` meets where it is not installed
    with pytest.raises(ConfigError, match=re.escape("needs the timm package, which is not installed; run pip install "
                                                    "'recog[timm]'")):
        check_backbone("timm:resnet18")
    check_backbone("convnet")  # the other backbones never import it


def hub_cache(home: Path, repo: str, model: torch.nn.Module) -> Path:
    """A Hugging Face cache (HF_HOME) holding `model`'s weights as the Hub repo `repo`'s model.safetensors, laid
    out as huggingface_hub lays out a download: what HF_HUB_OFFLINE=1 reads instead of the network."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / revision).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    safetensors_torch.save_file(model.state_dict(), str(folder / "snapshots" / revision / "model.safetensors"))
    return home


@pytest.mark.slow  # torchrun with 2 processes
def test_pretrained_true_reads_the_hub_cache_local_rank_0_first(small_data, tmp_path):
    """model.pretrained=true on 2 processes with the weights in the Hugging Face cache and no network: local rank 0
    builds first and the other rank after it (recog.pretrained), both from the cache; the run trains."""
    torch.manual_seed(3)
    home = hub_cache(tmp_path / "hf", "timm/test_resnet.r160_in1k", timm.create_model("test_resnet"))
    result = run_train(train_args(small_data, tmp_path / "run", "test_resnet", **{"model.pretrained": "true"}),
                       cwd=tmp_path, nproc=2, extra_env={**OFFLINE, "HF_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading pretrained weights from Hugging Face hub (timm/test_resnet.r160_in1k)" in result.stdout
    assert "mean/std from the pretrained config of timm:test_resnet" in result.stdout
