#!/bin/sh
# Entrypoint of the gpu pool's image (deployments/gpu/Dockerfile): stop at once, saying why, when the
# container got no NVIDIA GPU (a Docker pool without device_requests, a Kubernetes pod without the
# nvidia.com/gpu limit), rather than fine-tune on the CPU for hours; then run the worker's command.
# GEMMA_LORA_REQUIRE_GPU=0 skips the check.
set -eu
if [ "${GEMMA_LORA_REQUIRE_GPU:-1}" = "1" ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gemma-lora-flow: this container has no NVIDIA GPU. Give it one (Docker work pool:" \
             "container_create_kwargs.device_requests; Kubernetes: the nvidia.com/gpu limit, see" \
             "deployments/gpu/), or set GEMMA_LORA_REQUIRE_GPU=0 to run on the CPU." >&2
        exit 70
    fi
fi
exec "$@"
