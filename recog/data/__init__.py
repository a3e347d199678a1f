"""Data: shard writing (`python -m recog.data`), manifests, the per-rank split and the streaming loader."""
