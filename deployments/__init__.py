"""Prefect deployments of gemma-lora-flow: ``prefect.yaml`` (the deployments), ``setup_local.py`` (one
command: work pools, the GPU concurrency limit, the deployments and a worker per pool) and ``gpu/``
(base job templates for real GPU pools on Docker or Kubernetes, and the worker image)."""
