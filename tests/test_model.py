"""The model: shapes, unit-length embeddings, backbones by name, weights from torchvision files."""

import pytest
import torch
import torchvision

from recog.errors import ConfigError
from recog.model import RecognitionModel, load_weights


@pytest.mark.parametrize("backbone,channels,size,small", [
    ("convnet", 1, 28, False), ("convnet", 3, 32, False), ("resnet18", 1, 28, True), ("resnet18", 3, 64, False),
])
def test_outputs(backbone, channels, size, small):
    model = RecognitionModel(backbone, num_classes=7, in_channels=channels, embedding_dim=24, small_input=small)
    out = model(torch.randn(3, channels, size, size))
    assert out.embeddings.shape == (3, 24) and out.logits.shape == (3, 7)
    assert torch.allclose(out.embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


def test_convnet_blocks_set_the_layers_per_stage_and_keep_the_default_s_weight_names():
    def convs(model):
        return [x for x in model.backbone.modules() if isinstance(x, torch.nn.Conv2d)]

    default, lighter = RecognitionModel("convnet", 10, 1), RecognitionModel("convnet", 10, 1, blocks=[1, 2, 2])
    assert [c.out_channels for c in convs(default)] == [32, 32, 64, 64, 128, 128]
    assert [c.out_channels for c in convs(lighter)] == [32, 64, 64, 128, 128]
    # the layout of the checkpoints written before `blocks` existed: conv-BN-ReLU blocks, max-pools between stages
    assert "backbone.7.0.weight" in default.state_dict() and "backbone.3.0.weight" in default.state_dict()
    assert lighter(torch.randn(2, 1, 28, 28)).embeddings.shape == (2, 128)


def test_unknown_backbone_names_the_fix():
    with pytest.raises(ConfigError, match="unknown model 'resnet1000'.*model=resnet18"):
        RecognitionModel("resnet1000", num_classes=3)


def test_model_code_knows_nothing_about_distribution():
    import recog.loss
    import recog.model

    for module in (recog.model, recog.loss):
        assert "torch.distributed" not in open(module.__file__).read()


def test_torchvision_weights_load_into_a_grey_model():
    reference = torchvision.models.resnet18()
    model = RecognitionModel("resnet18", num_classes=5, in_channels=1)
    load_weights(model, reference.state_dict())
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.allclose(model.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    with pytest.raises(ConfigError, match="shape"):
        load_weights(RecognitionModel("resnet18", 5, 1, small_input=True), reference.state_dict())
    with pytest.raises(ConfigError, match="shape"):
        load_weights(RecognitionModel("resnet50", 5, 1), reference.state_dict())
    partial = {k: v for k, v in reference.state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(ConfigError, match="lack .* backbone entries"):
        load_weights(model, partial)
