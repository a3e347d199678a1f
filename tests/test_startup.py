"""What a training rank imports before its first step: only what it uses (bench/startup.py times the start)."""

import subprocess
import sys

# Imported by nothing a rank other than 0 runs on the default job: TensorBoard (rank 0's writer imports it),
# and the optional packages of other features (faiss: indexes; timm: timm backbones; mlflow: logger=mlflow;
# the serving and peer-benchmark libraries).
NOT_AT_IMPORT = ("tensorboard", "boto3", "faiss", "timm", "mlflow", "litserve", "lightning", "accelerate")


def test_train_imports_no_optional_package():
    code = ("import sys; import train; import recog.train; "
            f"print(' '.join(m for m in {NOT_AT_IMPORT!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == [], f"importing train.py and recog.train imported {out.stdout.split()}"


def test_rank_zero_writer_still_writes_tensorboard(tmp_path):
    from recog.log import make_writer

    writer = make_writer(tmp_path, is_main=True)
    writer.add_scalar("train/loss", 1.0, 1)
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
