"""Workloads: who owns the GPU work on a node, and each one's share of a GPU's energy.

A workload is a container of a Kubernetes pod, a container, a systemd unit, or a process by
command name (`cgroups`: from `/proc/<pid>/cgroup`). The kubelet's pod-resources API says
which container holds which GPU or MIG instance (`podresources`). `share` splits one GPU's
interval energy among workloads, exclusively or by SM utilisation, leaving what has no
owner unattributed, so that per GPU Σ workloads + unattributed is the measured energy.

This package reads `/proc` and the kubelet's socket; NVML's process lists and per-process
utilisation come from `agent.devices.nvml`, never from here (docs/design.md §2).
"""
