"""Token-supervised data: records, sources (paper's jsonl, COCO, shapes world), dataset + collate, latent cache.

Submodules are imported on demand (``from tokencompose.data.dataset import TokenDataset``) so that
importing one source does not pull in the heavy dependencies of another (spaCy, pycocotools).
"""
