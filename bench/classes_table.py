"""Per-GPU memory and per-step communication of a large classifier, from formulas (no GPU, no torch).

    python bench/classes_table.py                 # docs/classes.md's main table
    python bench/classes_table.py --insightface   # the formulas against insightface's published memory figures

Three ways to hold a C x D classifier on W GPUs, each GPU with a batch of b images (global batch B = b W):

  replicated  every GPU holds all C x D; DDP all-reduces the whole C x D gradient each step
  sharded     each GPU holds C/W rows (model-parallel softmax, Partial FC with sample_rate 1)
  sampled     sharded, and each step scores only the positives plus a random r of each shard's rows

Arithmetic only: none of these figures was measured. The assumptions are the constants below; docs/classes.md
states them in words. Backbone, its activations and gradients, the CUDA context and allocator slack are left out.
"""
import argparse
import math

D = 512             # embedding width
PER_GPU_BATCH = 128  # images per GPU per step (insightface's default config.batch_size)
FP32 = 4            # bytes: classifier weights, gradients, optimizer state, logits, embeddings
INT64 = 8           # bytes: a label
LOGIT_COPIES = 2    # B x (classes scored) fp32 tensors alive at the peak: the logits and their softmax/gradient
NORMALISED = 4      # bytes per scored element: the cosine classifier's L2-normalised rows, kept for the backward
SAMPLE_RATE = 0.1
GPU_BYTES = 80 * 2**30  # an 80 GB card; a cell above this is marked even before the backbone is counted
STATE_BYTES = {"SGD": 4, "AdamW": 8}  # per element: momentum; exp_avg + exp_avg_sq

CLASSES = (1_000_000, 10_000_000, 100_000_000)
GPUS = (8, 64, 512)


def weight_bytes_per_element(optimizer):
    """Weights + gradient + optimizer state: 12 bytes (SGD with momentum) or 16 (AdamW)."""
    return FP32 + FP32 + STATE_BYTES[optimizer]


def ring_allreduce(nbytes, world):
    """Bytes each GPU sends (and receives) in a ring all-reduce of `nbytes`."""
    return 2 * (world - 1) / world * nbytes


def ring_allgather(total_bytes, world):
    """Bytes each GPU sends (and receives) to gather `total_bytes` spread evenly over `world` GPUs (or to
    reduce-scatter them: the same traffic)."""
    return (world - 1) / world * total_bytes


def replicated(classes, world, optimizer, b=PER_GPU_BATCH, dim=D):
    """Every GPU: all weights (and their normalised copy), its own b x C logits; the gradient all-reduce carries
    all C x D."""
    memory = (classes * dim * (weight_bytes_per_element(optimizer) + NORMALISED)
              + LOGIT_COPIES * b * classes * FP32)
    comm = ring_allreduce(classes * dim * FP32, world) if world > 1 else 0.0
    return memory, comm


def sharded_comm(world, b=PER_GPU_BATCH, dim=D):
    """Per GPU per step, independent of the class count: all-gather of the embeddings and labels; all-reduce of
    each sample's max logit, sum of exponentials and target logit; in the backward, the embedding gradient
    reduced back to the GPU that computed each embedding (a reduce-scatter)."""
    batch = b * world
    return (ring_allgather(batch * dim * FP32, world)          # embeddings
            + ring_allgather(batch * INT64, world)             # labels
            + 3 * ring_allreduce(batch * FP32, world)          # max, sum of exp, target logit
            + ring_allgather(batch * dim * FP32, world))       # embedding gradient


def sampled_rows(classes, world, rate, b=PER_GPU_BATCH):
    """Rows a shard scores in one step: rate of its rows, but never fewer than its positives (about b of the
    global batch's labels fall in each shard's classes, at most one per row)."""
    local = classes / world
    return max(math.ceil(rate * local), min(b, local))


def sharded(classes, world, optimizer, rate=1.0, b=PER_GPU_BATCH, dim=D):
    """Each GPU: C/W rows with gradient and state; the normalised copy of the rows it scores; B x (rows scored)
    logits; the gathered embeddings and their gradient. With rate < 1 the scored rows are also copied out of the
    shard (and get a gradient), as insightface's partial_fc_v2.py does (`self.weight[self.weight_index]`); the
    shard's gradient stays dense (rows not drawn get zeros)."""
    local = classes / world
    batch = b * world
    memory = local * dim * weight_bytes_per_element(optimizer) + 2 * batch * dim * FP32
    if rate < 1:
        rows = sampled_rows(classes, world, rate, b)
        memory += 2 * rows * dim * FP32  # the sampled rows and their gradient
    else:
        rows = local
    memory += rows * dim * NORMALISED + LOGIT_COPIES * batch * rows * FP32
    return memory, sharded_comm(world, b, dim)


def gib(nbytes):
    value = nbytes / 2**30
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def marked(nbytes):
    text = gib(nbytes)
    return f"**{text} ✗**" if nbytes > GPU_BYTES else text


def size(nbytes):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{nbytes:.0f} B"


def count(n):
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n:,}"


# insightface's published figures where its setup matches a row of the main table (docs/classes.md gives sources).
PUBLISHED = {
    (1_000_000, 8): "8 V100, fp16, R50: data parallel 23,708, model parallel 9,966, PFC 0.1 5,620 MB",
    (10_000_000, 64): "64 RTX2080Ti, fp16, R50, 32/GPU MP, 64/GPU PFC: model parallel 9,684, PFC 6,722 MB",
}


def main_table():
    rows = ["| classes | GPUs | global batch | replicated GiB (SGD / AdamW) | sharded GiB (SGD / AdamW) "
            f"| sampled {SAMPLE_RATE} GiB (SGD / AdamW) | replicated: sent per GPU per step "
            "| sharded or sampled: sent per GPU per step | insightface published, whole process per GPU |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for classes in CLASSES:
        for world in GPUS:
            memory = {o: (replicated(classes, world, o)[0], sharded(classes, world, o)[0],
                          sharded(classes, world, o, SAMPLE_RATE)[0]) for o in ("SGD", "AdamW")}
            cells = [f"{marked(memory['SGD'][i])} / {marked(memory['AdamW'][i])}" for i in range(3)]
            rows.append(f"| {count(classes)} | {world} | {PER_GPU_BATCH * world:,} | " + " | ".join(cells)
                        + f" | {size(replicated(classes, world, 'SGD')[1])} | {size(sharded_comm(world))} "
                        f"| {PUBLISHED.get((classes, world), '')} |")
    return "\n".join(rows)


# insightface's published per-GPU memory (MiB, from gpustat/nvidia-smi, whole process: backbone included).
# recognition/arcface_torch/docs/speed_benchmark.md (added in commit c0b95cc6, July 2021), table 2: ResNet-50,
# 8 x Tesla V100 32GB, mixed precision; per-GPU batch not stated in the table (the same file's 3M test uses the
# 3millions config of the time: batch_size 128 per GPU, fp16, SGD momentum 0.9).
V100_TABLE = {  # identities: (data parallel, model parallel, Partial FC 0.1); None: out of memory
    125_000: (7358, 5306, 4868), 250_000: (9940, 5826, 5004), 500_000: (14220, 7114, 5202),
    1_000_000: (23708, 9966, 5620), 1_400_000: (32252, 11178, 6056), 2_000_000: (None, 13978, 6472),
    4_000_000: (None, 23238, 8284), 5_500_000: (None, 32188, 9854), 8_000_000: (None, None, 12310),
    16_000_000: (None, None, 19950), 29_000_000: (None, None, 32324),
}


def slope(points):
    """Least-squares slope of (x, y) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def insightface_table():
    """Memory per extra million classes: the slope of insightface's V100 table against the formulas' slope for
    the same setup (8 GPUs, 128 per GPU, D 512, SGD), and the formulas at a few published points."""
    world, million = 8, 1_000_000
    out = ["| per GPU, per extra 1M classes (8 GPUs, 128 per GPU) | published slope, MiB | formula, MiB "
           "| published / formula |", "|---|---:|---:|---:|"]
    formulas = (("data parallel (replicated)", 0, lambda c: replicated(c, world, "SGD")[0]),
                ("model parallel (sharded)", 1, lambda c: sharded(c, world, "SGD")[0]),
                ("Partial FC 0.1 (sampled)", 2, lambda c: sharded(c, world, "SGD", SAMPLE_RATE)[0]))
    for name, column, formula in formulas:
        points = [(c / million, row[column]) for c, row in V100_TABLE.items() if row[column] is not None]
        published = slope(points)
        predicted = (formula(2 * million) - formula(million)) / 2**20
        out.append(f"| {name} ({len(points)} rows, {points[0][0]:g}M-{points[-1][0]:g}M) | {published:,.0f} "
                   f"| {predicted:,.0f} | {published / predicted:.1f} |")
    out += ["", "| setup (source) | published MiB per GPU (whole process) | formula, classifier only, MiB |",
            "|---|---|---|"]
    setups = (  # (label, classes, world, per-GPU batch model parallel, per-GPU batch Partial FC, published)
        ("3M, 8 V100, 128/GPU (speed_benchmark.md, gpustat)", 3_000_000, 8, 128, 128, "28,860-30,338 / 10,328-10,488"),
        ("1M, 8 RTX2080Ti, 128/GPU (partial_fc/README.md)", 1_000_000, 8, 128, 128, "10,408 / 8,100"),
        ("10M, 64 RTX2080Ti, 32/GPU MP, 64/GPU PFC (partial_fc/README.md)", 10_000_000, 64, 32, 64,
         "9,684 / 6,722"),
    )
    for label, classes, gpus, b_mp, b_pfc, published in setups:
        mp = sharded(classes, gpus, "SGD", b=b_mp)[0] / 2**20
        pfc = sharded(classes, gpus, "SGD", SAMPLE_RATE, b=b_pfc)[0] / 2**20
        out.append(f"| {label} | model parallel / PFC 0.1: {published} | {mp:,.0f} / {pfc:,.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--insightface", action="store_true",
                        help="compare the formulas with insightface's published memory figures")
    print(insightface_table() if parser.parse_args().insightface else main_table())
