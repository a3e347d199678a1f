"""Every option of every config group in conf/, and every experiment, composed from the real `train` config,
checked by check_config and built the way recog/train.py builds it: the model on a forward and backward pass,
the optimizer for one step, the loss on a model's output, the augmentation on an image, the data and sampler
groups on real (tiny) shards, each experiment for one training step, the Hydra launchers.

The options are found by listing conf/ when the tests are collected: a file added there is covered with no change
here, and a new group directory fails test_every_config_group_in_conf_is_covered_here until it has its test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recog.build import build_data, build_loss, build_recipe, train_decoding
from recog.config import check_config, settle_data_settings
from recog.data.decode import CropWhileDecoding, decode_image
from recog.data.idx import find_idx_pair
from recog.data.manifest import load_manifest
from recog.data.normalize import Normalize
from recog.data.prepare import parse_class_names
from recog.data.random_access import ShardRandomAccess
from recog.data.sampler import DistributedBatchSampler
from recog.data.stream import ShardStream
from recog.dist import Dist
from recog.errors import ConfigError
from recog.loss import RecognitionLoss
from recog.model import Output
from recog.rundir import compose_train_config

CONF = ROOT / "conf"
# The groups this file has a test for; conf/hydra/ holds Hydra's own groups (only its launcher is ours to test).
COVERED_GROUPS = {"data", "augment", "model", "optim", "loss", "sampler", "experiment", "hydra", "logger"}
COVERED_HYDRA_GROUPS = {"launcher"}
# Files that are not options but pieces the options of their group include through their defaults list.
FRAGMENTS = {"data": {"common"}}
# The sampler names recog/train.py's build_data knows: `pk` builds P×K batches; any other name streams.
SAMPLERS = {"pk": DistributedBatchSampler, "stream": ShardStream}
# Hydra launcher configs that plugins provide (named in the defaults of ours), and the module each plugin installs.
LAUNCHER_PLUGINS = {
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "ray": "hydra_plugins.hydra_ray_launcher",
    "ray_aws": "hydra_plugins.hydra_ray_launcher",
    "rq": "hydra_plugins.hydra_rq_launcher",
}
ONE_PROCESS = Dist(0, 0, 1, 1, torch.device("cpu"), None)  # build_data without a process group


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def options(group: str) -> list[str]:
    """The options of a config group: its conf/<group>/*.yaml files, shared fragments left out."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem not in FRAGMENTS.get(group, set()))


def defaults_of(path: Path) -> list:
    """A config file's defaults list, as written."""
    return (yaml.safe_load(path.read_text()) or {}).get("defaults", [])




def tiny_paths(tiny_data) -> list[str]:
    return [f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}"]


def composed_on_tiny_data(tiny_data, *overrides: str):
    """`train` with these overrides on the tiny shards, checked as train.py checks it, its `auto` values settled
    from the manifest as train.py settles them (channels 1, 28 px, unless the overrides say otherwise)."""
    cfg = compose_train_config(*tiny_paths(tiny_data), *overrides)
    check_config(cfg)
    settle_data_settings(cfg, load_manifest(tiny_data["train"]), None).write_into(cfg)
    check_config(cfg)  # the settled values pass the same checks
    return cfg


def labelled_batch(cfg, n: int = 8, classes: int = 4):
    """n normalised random images of the config's channels and size, two or more of each class (miners find pairs)."""
    g = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    images = torch.randint(0, 256, (n, cfg.data.channels, size, size), dtype=torch.uint8, generator=g)
    return Normalize(cfg.data.mean, cfg.data.std)(images), torch.arange(n) % classes


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
        return False


def parameters_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_every_config_group_in_conf_is_covered_here():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert groups == COVERED_GROUPS, f"config groups without a test in tests/test_configs.py: {groups - COVERED_GROUPS}"
    hydra_groups = {p.name for p in (CONF / "hydra").iterdir() if p.is_dir()}
    assert hydra_groups <= COVERED_HYDRA_GROUPS, f"hydra/ groups without a test: {hydra_groups - COVERED_HYDRA_GROUPS}"
    for group in COVERED_GROUPS - {"hydra"}:
        assert options(group), f"conf/{group}/ has no options"
    assert options("hydra/launcher")


@pytest.mark.parametrize("group,fragment", [(g, f) for g, fs in FRAGMENTS.items() for f in sorted(fs)])
def test_the_files_left_out_as_fragments_are_included_by_an_option(group, fragment):
    """A file is left out of the options only while another option of its group includes it."""
    assert (CONF / group / f"{fragment}.yaml").is_file(), f"conf/{group}/{fragment}.yaml is gone: not a fragment"
    including = [option for option in options(group) if fragment in defaults_of(CONF / group / f"{option}.yaml")]
    assert including, f"no option of conf/{group}/ includes {fragment}.yaml: it is an option of its own, not a fragment"


@pytest.mark.parametrize("name", options("data"))
def test_every_data_config_composes_passes_the_checks_and_loads_a_batch_of_each_split(name, tiny_data):
    cfg = compose_train_config(f"data={name}", *tiny_paths(tiny_data), "batch_size=8")
    check_config(cfg)
    cfg.data.num_workers = 0  # checked above as configured; batches are read here, in this process
    data = build_data(cfg, ONE_PROCESS)  # settles the auto values from the manifest
    assert len(data.classes) == 10
    size = cfg.data.image_size
    for batch in (next(data.batches(data.start())), next(iter(data.test_loader))):
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (cfg.data.channels, size, size)
        assert len(batch.labels) == len(batch.images) > 0
    # where the config writes shards on first use: its own train/test folders, from an idx_dir with both splits
    shipped = compose_train_config(f"data={name}")
    if shipped.data.get("prepare"):
        prepare = shipped.data.prepare
        assert {"out", "idx_dir"} <= set(prepare), f"data={name}: prepare needs out and idx_dir"
        for split in ("train", "test"):
            if not OmegaConf.is_missing(shipped.data, split):
                assert Path(shipped.data[split]) == Path(prepare.out) / split, f"data={name}: prepare would never " \
                    f"write data.{split}={shipped.data[split]} (it writes {prepare.out}/{split})"
            if Path(prepare.idx_dir).resolve().is_relative_to(ROOT):  # bundled with recog: must be there
                find_idx_pair(prepare.idx_dir, split)
        names = parse_class_names(prepare.get("class_names"))
        assert names is None or len(names) >= 2


@pytest.mark.parametrize("channels", [1, 3])  # the tiny shards are grey; data.channels=3 reads them as RGB
@pytest.mark.parametrize("name", options("model"))
def test_every_model_config_builds_and_runs_a_forward_pass(name, channels, tiny_data):
    """Built as train.py builds it (num_classes from the data, in_channels from data.channels), at the tiny shards'
    28 px; every parameter gets a gradient, as DDP (find_unused_parameters=False) requires."""
    cfg = composed_on_tiny_data(tiny_data, f"model={name}", f"data.channels={channels}")
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=10, in_channels=cfg.data.channels)
    images, labels = labelled_batch(cfg, n=2)
    out = model(images)
    assert isinstance(out, Output)
    assert out.embeddings.shape == (2, cfg.model.embedding_dim) and out.logits.shape == (2, 10)
    assert torch.isfinite(out.logits).all()
    assert torch.allclose(out.embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    torch.nn.functional.cross_entropy(out.logits, labels).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"model={name}: parameters that get no gradient (DDP fails on them): {unused[:5]}"


@pytest.mark.parametrize("name", options("optim"))
def test_every_optim_config_builds_its_optimizer_and_takes_a_step(name, tiny_data):
    cfg = composed_on_tiny_data(tiny_data, f"optim={name}", "model.width=4", "model.embedding_dim=8")
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=10, in_channels=cfg.data.channels)
    lr = cfg.optim.lr * 2 * cfg.batch_size / cfg.optim.reference_batch  # train.py's scaling, for 2 processes
    optimizer = instantiate(cfg.optim.optimizer)(model.parameters(), lr=lr)
    assert isinstance(optimizer, torch.optim.Optimizer) and optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    settings = OmegaConf.to_container(cfg.optim.optimizer)
    for key, value in settings.items():  # what the config sets is what the optimizer uses
        if not key.startswith("_"):
            used = optimizer.defaults[key]
            assert (list(used) if isinstance(used, tuple) else used) == value, f"optim={name}: {key}"
    before = parameters_of(model)
    images, labels = labelled_batch(cfg)
    build_loss(cfg, 10)(model(images), labels)["total"].backward()
    optimizer.step()
    after = parameters_of(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before), f"optim={name}: the step changed nothing"


@pytest.mark.parametrize("name", options("loss"))
def test_every_loss_config_builds_and_gives_a_finite_total_with_gradients(name, tiny_data):
    cross_rank = compose_train_config(f"loss={name}").loss.get("cross_rank")
    cfg = composed_on_tiny_data(tiny_data, f"loss={name}", *(["sampler=pk"] if cross_rank else []),
                                "model.width=4", "model.embedding_dim=8")
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=10, in_channels=cfg.data.channels)
    loss_fn = build_loss(cfg, num_classes=10)  # as train.py builds it (a proxy loss's num_classes from the data)
    assert isinstance(loss_fn.cross_rank, bool)  # train.py reads it to hand the loss its all-gather
    images, labels = labelled_batch(cfg)
    terms = loss_fn(model(images), labels)
    assert terms["total"].dim() == 0 and torch.isfinite(terms["total"])
    if isinstance(loss_fn, RecognitionLoss) and loss_fn.metric is not None:
        assert "metric" in terms and torch.isfinite(terms["metric"]), f"loss={name}: its metric term never runs " \
            f"(metric_weight={cfg.loss.metric_weight})"
    terms["total"].backward()
    assert model.class_weights.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0
    unused = [n for n, p in loss_fn.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unused, f"loss={name}: its own parameters get no gradient (they would never train): {unused}"


@pytest.mark.parametrize("size", [28, 96])  # the `small` preset's sizes, and photos (augment=auto: imagenet)
@pytest.mark.parametrize("name", options("augment"))
def test_every_augment_preset_builds_train_and_test_transforms_giving_the_configured_size(name, size, tiny_data):
    cfg = composed_on_tiny_data(tiny_data, f"augment={name}", f"data.image_size={size}")
    assert cfg.augment.name != "auto" and cfg.augment.name in options("augment")  # auto picked a preset
    train, test = instantiate(cfg.augment.train), instantiate(cfg.augment.test)
    image = torch.randint(0, 256, (cfg.data.channels, 40, 52), dtype=torch.uint8)  # neither square nor `size`
    torch.manual_seed(0)
    for transform in (train, test):
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (cfg.data.channels, size, size)
    assert all(torch.equal(test(image), test(image)) for _ in range(8)), f"augment={name}: a random test transform"


@pytest.mark.parametrize("name", options("sampler"))
def test_every_sampler_config_names_a_sampler_that_train_builds_and_batches_with(name, tiny_data):
    cfg = compose_train_config(f"sampler={name}", *tiny_paths(tiny_data), "batch_size=8", "data.num_workers=0")
    check_config(cfg)
    assert cfg.sampler.name in SAMPLERS, f"sampler={name}: train.py knows no sampler named {cfg.sampler.name!r} " \
        f"(it would stream silently); use one of {sorted(SAMPLERS)}"
    data = build_data(cfg, ONE_PROCESS)
    assert isinstance(data.epochs, SAMPLERS[cfg.sampler.name]) and len(data.epochs) >= 1
    batch = next(data.batches(data.start()))
    assert len(batch.labels) == data.batch_size == len(batch.images)
    if cfg.sampler.name == "pk":  # P classes, K images of each
        assert isinstance(data.loader.dataset, ShardRandomAccess)
        assert sorted(torch.bincount(batch.labels).tolist())[-cfg.sampler.p:] == [cfg.sampler.k] * cfg.sampler.p
        assert len(batch.labels.unique()) == cfg.sampler.p


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_changes_the_defaults_and_trains_one_step(name, tiny_data):
    cfg = compose_train_config(f"experiment={name}", *tiny_paths(tiny_data))
    assert "experiment" not in cfg, f"experiment={name} landed under cfg.experiment: it needs `# @package _global_`"
    assert cfg != compose_train_config(*tiny_paths(tiny_data)), f"experiment={name} changes nothing"
    check_config(cfg)
    cfg.data.num_workers = 0
    # recog/train.py's train(), up to its first optimizer step, in this process
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, ONE_PROCESS)
    assert isinstance(data.epochs, SAMPLERS[cfg.sampler.name])
    recipe = build_recipe(cfg, ONE_PROCESS, data)
    before = parameters_of(recipe.trained)  # the model's and the loss's own
    images, labels = recipe.inputs(next(data.batches(data.start())))
    loss = recipe.trained(images, labels)["total"]
    assert torch.isfinite(loss)
    loss.backward()
    recipe.optimizer.step()
    recipe.scheduler.step()
    moved = {k.split(".")[0] for k, p in recipe.trained.named_parameters() if not torch.equal(before[k], p)}
    assert moved == ({"model", "loss"} if list(recipe.loss_fn.parameters()) else {"model"}), moved
    recipe.model.eval()
    with torch.no_grad():
        out = recipe.model(recipe.inputs(next(iter(data.test_loader)))[0])
    assert torch.isfinite(out.embeddings).all() and out.logits.shape[1] == len(data.classes)


@pytest.mark.parametrize("name", options("hydra/launcher"))
def test_every_hydra_launcher_config_composes_fits_its_plugin_and_instantiates(name, tiny_data):
    own = set(options("hydra/launcher"))
    bases = [entry for entry in defaults_of(CONF / "hydra" / "launcher" / f"{name}.yaml")
             if isinstance(entry, str) and entry != "_self_" and entry not in own]
    for base in bases:
        assert base in LAUNCHER_PLUGINS, f"hydra/launcher={name} builds on {base!r}, a launcher of no plugin known " \
            f"here: a typo, or add it to LAUNCHER_PLUGINS"
        if not installed(LAUNCHER_PLUGINS[base]):
            pytest.skip(f"hydra/launcher={name} needs the {LAUNCHER_PLUGINS[base]} plugin, not installed here")
    from hydra.core.config_store import ConfigStore
    from hydra.plugins.launcher import Launcher

    cfg = compose_train_config(f"hydra/launcher={name}", *tiny_paths(tiny_data), hydra=True)
    check_config(cfg)
    settings = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    for base in bases:  # Hydra accepts keys its plugin's schema lacks; the plugin would fail on them at launch
        OmegaConf.merge(ConfigStore.instance().load(f"hydra/launcher/{base}.yaml").node, settings)
    launcher = instantiate(cfg.hydra.launcher)  # as Hydra instantiates it for `train.py -m`
    assert isinstance(launcher, Launcher)
    for callback in cfg.hydra.callbacks.values():  # and the callbacks train.yaml gives every sweep
        instantiate(callback)


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_bad_worker_count_is_one_sentence(value, tiny_data):
    with pytest.raises(ConfigError, match=rf"data.num_workers={value} is not valid; give a whole number at least 0"):
        check_config(compose_train_config(*tiny_paths(tiny_data), f"data.num_workers={value}"))


@pytest.mark.parametrize("overrides,message", [
    (["model=resnet18", "model.backbone=mobilenet_v2"], "model.small_input=true is only for ResNet-style models"),
    (["data.channels=3", "data.mean=[0.5]"], r"data.mean has 1 values for 3 channel\(s\)"),
    (["data.channels=1", "data.std=[0.2,0.2,0.2]"], r"data.std has 3 values for 1 channel\(s\)"),
])
def test_values_that_need_no_data_are_checked_before_any_process_group(tiny_data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train_config(*tiny_paths(tiny_data), *overrides))


def test_values_that_need_the_data_are_checked_once_the_shards_are_read(tiny_data):
    """data.channels=auto: a mean of 3 values is wrong only for the grey shards; check_config cannot know."""
    cfg = compose_train_config(*tiny_paths(tiny_data), "data.mean=[0.5,0.5,0.5]", "data.num_workers=0")
    check_config(cfg)
    with pytest.raises(ConfigError, match=r"data.mean has 3 values for 1 channel\(s\)"):
        build_data(cfg, ONE_PROCESS)


def test_jpeg_scaled_decode_takes_the_preset_crop_into_decoding_unless_off_or_kept_decoded(tiny_data):
    cfg = composed_on_tiny_data(tiny_data, "augment=imagenet", "data.image_size=96")
    decode, transform = train_decoding(cfg, keep_decoded=False)  # auto: on
    assert isinstance(decode, CropWhileDecoding) and decode.size == [96, 96]
    assert type(transform).__name__ == "RandomHorizontalFlip" and transform.p == cfg.augment.flip
    for off in (composed_on_tiny_data(tiny_data, "augment=imagenet", "data.jpeg_scaled_decode=false"), cfg):
        decode, transform = train_decoding(off, keep_decoded=off is cfg)  # kept decoded: whole images are kept
        assert decode is decode_image and [type(t).__name__ for t in transform.transforms] == [
            "RandomResizedCrop", "RandomHorizontalFlip"]  # the preset as it is, on the whole image: as before
    decode, transform = train_decoding(composed_on_tiny_data(tiny_data, "augment=small"), keep_decoded=False)
    assert decode is decode_image  # no random resized crop to take into decoding


@pytest.mark.parametrize("value", ["yes", "1", "null"])
def test_bad_jpeg_scaled_decode_is_one_sentence(value, tiny_data):
    with pytest.raises(ConfigError, match=rf"^data.jpeg_scaled_decode={'None' if value == 'null' else value} is "
                                          "not valid; give true, false or auto.$"):
        check_config(compose_train_config(*tiny_paths(tiny_data), f"data.jpeg_scaled_decode={value}"))


def test_jpeg_scaled_decode_without_simplejpeg_is_off_when_auto_and_one_sentence_when_true(tiny_data, monkeypatch):
    monkeypatch.setattr("recog.config.SCALED_DECODE_AVAILABLE", False)
    monkeypatch.setattr("recog.data.decode.SCALED_DECODE_AVAILABLE", False)
    with pytest.raises(ConfigError, match=r"^data.jpeg_scaled_decode=true needs simplejpeg, which is not installed "
                                          r"here: `pip install simplejpeg`, or set data.jpeg_scaled_decode=auto.$"):
        check_config(compose_train_config(*tiny_paths(tiny_data), "data.jpeg_scaled_decode=true"))
    cfg = composed_on_tiny_data(tiny_data, "augment=imagenet", "data.image_size=96")  # auto: no error
    assert train_decoding(cfg, keep_decoded=False)[0] is decode_image  # PIL, as with false


def test_gpu_decode_without_a_gpu_is_one_sentence(tiny_data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^data.decode=gpu needs a CUDA GPU, which this machine lacks; use "
                                          r"data.decode=cpu.$"):
        check_config(compose_train_config(*tiny_paths(tiny_data), "data.decode=gpu"))
    check_config(compose_train_config(*tiny_paths(tiny_data)))  # the default, cpu, needs none


@pytest.mark.parametrize("overrides,message", [
    (["data.decode=tpu"], r"^data.decode=tpu is not valid; give cpu \(in the loader workers\) or gpu.$"),
    (["data.decode=gpu", "dist.backend=gloo"], r"^data.decode=gpu decodes on the training GPU, but dist.backend=gloo "
                                               r"trains on the CPU: use data.decode=cpu, or dist.backend=nccl.$"),
    (["data.decode=gpu", "data.jpeg_scaled_decode=true"],
     r"^data.jpeg_scaled_decode=true asks the loader workers to decode, but data.decode=gpu decodes on the GPU: "
     r"leave data.jpeg_scaled_decode at auto, or use data.decode=cpu.$"),
    (["data.decode=gpu", "TorchCodec missing"],
     r"^data.decode=gpu needs TorchCodec, which is not installed here \(or not for this torch\): "
     r"`pip install torchcodec`, or use data.decode=cpu.$"),
])
def test_gpu_decode_where_it_cannot_work_is_one_sentence_on_a_gpu_machine_too(tiny_data, monkeypatch, overrides,
                                                                              message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    check_config(compose_train_config(*tiny_paths(tiny_data), "data.decode=gpu"))  # what works there
    if "TorchCodec missing" in overrides:
        monkeypatch.setattr("recog.config.GPU_DECODE_AVAILABLE", False)
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train_config(*tiny_paths(tiny_data), *[o for o in overrides if "=" in o]))
