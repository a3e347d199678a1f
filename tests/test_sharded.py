"""recog.sharded: a classifier whose rows are split across ranks (Partial FC), against the replicated classifier.

The pure parts (which rows a rank holds, which rows Partial FC draws) are checked without a process group; the
rest in real gloo groups of 1 to 4 processes (tests/sharded_checks.py), each compared with one process computing
RecognitionModel's classifier and RecognitionLoss on the whole global batch.
"""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from sharded_checks import CASES, SCALE, TinyModel, run, step_data, step_rows

from recog.build import parameter_groups
from recog.errors import ConfigError
from recog.loss import RecognitionLoss
from recog.model import Output
from recog.sharded import ShardedClassifier, class_slice, sample_rows, sharded_names
from recog.step import StepRecipe

TOLERANCE = 1e-5  # fp32; the sums run in another order than the replicated classifier's
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("num_classes", [1, 4, 7, 10, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_class_slice_splits_as_tensor_split(num_classes, world_size):
    if num_classes < world_size:
        return
    expected = torch.tensor_split(torch.arange(num_classes), world_size)
    slices = [class_slice(rank, world_size, num_classes) for rank in range(world_size)]
    assert [list(s) for s in slices] == [t.tolist() for t in expected]


def test_class_slice_gives_the_first_ranks_one_more():
    assert [class_slice(r, 4, 10) for r in range(4)] == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]


def test_sample_rows_is_deterministic_keeps_positives_and_counts():
    positives = torch.tensor([2, 17, 40])
    drawn = sample_rows(positives, 50, 0.2, seed=5, step=3, rank=1)
    assert torch.equal(drawn, sample_rows(positives, 50, 0.2, seed=5, step=3, rank=1))  # an exact resume
    assert len(drawn) == 10 and torch.isin(positives, drawn).all() and torch.equal(drawn, drawn.sort().values)
    assert len(drawn.unique()) == 10
    others = {tuple(sample_rows(positives, 50, 0.2, seed, step, rank).tolist())
              for seed, step, rank in [(5, 4, 1), (5, 3, 2), (6, 3, 1)]}
    assert tuple(drawn.tolist()) not in others and len(others) == 3  # each of seed, step, rank changes the draw
    many = torch.arange(0, 50, 2)  # more positives than the rate's count: all of them, nothing else
    assert torch.equal(sample_rows(many, 50, 0.2, 5, 3, 1), many)
    assert torch.equal(sample_rows(positives, 50, 1.0, 5, 3, 1), torch.arange(50))


def test_refuses_more_ranks_than_classes_and_a_bad_sample_rate():
    with pytest.raises(ConfigError, match="cannot give each of 4 ranks a row"):
        ShardedClassifier(3, 8, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="sample_rate=0"):
        ShardedClassifier(10, 8, sample_rate=0.0)
    with pytest.raises(ConfigError, match=r"shape \(9, 8\) and this one needs \(10, 8\)"):
        ShardedClassifier(10, 8, rank=1, world_size=3).load_rows(torch.zeros(9, 8))


def test_one_process_without_a_process_group_is_the_replicated_loss():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(9, 8), dim=1)
    labels, rows = torch.randint(0, 7, (9,)), torch.randn(7, 8)
    classifier = ShardedClassifier(7, 8, label_smoothing=0.1, arc_margin=0.5)
    classifier.load_rows(rows)
    mine = embeddings.clone().requires_grad_(True)
    loss = classifier(mine, labels)
    loss.backward()
    theirs, weight = embeddings.clone().requires_grad_(True), rows.clone().requires_grad_(True)
    logits = 16.0 * theirs @ F.normalize(weight, dim=1).t()
    expected = RecognitionLoss(label_smoothing=0.1, arc_margin=0.5)(Output(theirs, logits), labels)["total"]
    expected.backward()
    assert abs(loss.item() - expected.item()) < TOLERANCE and expected.item() > 1
    assert (mine.grad - theirs.grad).abs().max() < TOLERANCE
    assert (classifier.weight.grad - weight.grad).abs().max() < TOLERANCE
    assert sharded_names(torch.nn.ModuleDict({"head": classifier})) == ["head.weight", "head.step"]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """Every rank's report from one real gloo group of `world_size` processes (forked: no second import of torch),
    and the weights after its StepRecipe steps."""
    world_size = request.param
    out = tmp_path_factory.mktemp(f"sharded{world_size}")
    mp.start_processes(run, (world_size, str(out / "init"), str(out)), nprocs=world_size, start_method="fork")
    return [{**json.loads((out / f"rank{r}.json").read_text()),
             "step": torch.load(out / f"step{r}.pt", weights_only=True)} for r in range(world_size)]


@pytest.mark.slow
def test_loss_and_every_gradient_equal_the_replicated_classifier(ranks):
    """Each rank's loss (its images' mean), its embeddings' gradient (world size × the replicated one: DDP divides
    the backbone's by it), the backbone's after DDP, and its rows' (no average): with label smoothing, ArcFace's
    margin, Partial FC drawing all rows (sample_rate 0.99) or a quarter of them, and a rank without images."""
    for rank, report in enumerate(ranks):
        for case, result in zip(CASES, report["cases"]):
            for what in ("loss", "embeddings", "backbone", "rows"):
                assert result[what] < TOLERANCE, (rank, case, what, result[what])
            assert min(result["sizes"][:2]) > 0.5  # gradients that could show a mistake
            assert result["sizes"][2] > 0.5 or (case[4] and rank == 1)  # a loss, but on a rank without images


@pytest.mark.slow
def test_ddp_leaves_the_rows_to_each_rank_and_keeps_the_backbone_equal(ranks):
    """One SGD step through DDP around backbone + sharded classifier: every rank's backbone is the same, and each
    rank's rows moved by their own gradient to the replicated step's rows (not rank 0's, not an average)."""
    for rank, report in enumerate(ranks):
        for case, result in zip(CASES, report["cases"]):
            assert result["backbone_equal_after_step"], (rank, case)
            assert result["rows_after_step"] < TOLERANCE, (rank, case)
            assert result["all_rows_after_step"] < TOLERANCE, (rank, case)  # all_rows: every rank's, in class order


@pytest.mark.slow
def test_partial_fc_draws_the_positives_and_leaves_the_others_without_gradient(ranks):
    sampled = [(case, result) for report in ranks for case, result in zip(CASES, report["cases"]) if case[3] < 1]
    for case, result in sampled:
        assert result["positives_drawn"] and result["drawn"] == result["expected_drawn"], (case, result)
        assert result["unsampled_grad"] == 0.0
    quarter = [result for case, result in sampled if case[3] == 0.25]
    assert sum(result["drawn"] for result in quarter) < 40  # some rows really were left out
    assert sum(result["drawn"] for result in quarter) >= math.ceil(0.25 * 40 / len(ranks)) * len(ranks)


@pytest.mark.slow
def test_top1_over_the_shards_is_the_replicated_argmax(ranks):
    """Including ties across ranks (a class's row repeated by a later class on another rank): the lower index."""
    for report in ranks:
        top1 = report["top1"]
        assert top1["index"] == top1["ref_index"] and top1["score"] < TOLERANCE
        # top1_in_rounds, a few images a round (ROUND_LOGITS): the same classes, but a query whose best rows are a
        # row and its copy (1 and 8, 4 and 9) may get either, since a matmul of fewer images rounds differently
        pairs = zip(top1["in_rounds"], top1["ref_index"])
        assert all(got == want or (want, got) in ((1, 8), (4, 9)) for got, want in pairs)
        assert len(top1["in_rounds"]) == len(top1["ref_index"])
    first = ranks[0]["top1"]["index"][0], ranks[-1]["top1"]["index"][-1]
    assert first == (1, 4)  # the queries equal to rows 1 and 4, which rows 8 and 9 repeat


@pytest.mark.slow
def test_recog_step_with_a_sharded_classifier_trains_as_one_process_on_the_global_batch(ranks):
    """Two steps of recog's StepRecipe (micro-batches, no_sync, loss × n / share, DDP, momentum SGD) with the rows
    sharded, against the same steps by one process holding all rows and the whole global batch."""
    world_size = len(ranks)
    everything = step_data(world_size)
    model = TinyModel(len(step_rows()))
    with torch.no_grad():
        model.class_weights.copy_(step_rows())
    loss_fn = RecognitionLoss(label_smoothing=0.1, arc_margin=0.5, logit_scale=SCALE)
    recipe = StepRecipe(model, torch.optim.SGD(parameter_groups(model, loss_fn, 0.5), lr=0.5, momentum=0.9),
                        loss_fn, global_batch=len(everything.labels))
    for _ in range(2):
        recipe.step(everything._replace(sizes=(2 * world_size, 2 * world_size)))
    moved = (model.class_weights.detach() - step_rows()).abs().max()
    assert moved > 0.01  # the steps changed the rows: the comparison below can fail
    for rank, report in enumerate(ranks):
        after = report["step"]
        classes = class_slice(rank, world_size, len(step_rows()))
        assert (after["embed.weight"] - model.embed.weight).abs().max() < TOLERANCE
        assert (after["embed.bias"] - model.embed.bias).abs().max() < TOLERANCE
        assert (after["rows"] - model.class_weights[classes.start: classes.stop]).abs().max() < TOLERANCE
