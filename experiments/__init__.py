"""Experiments on kronopt: workloads, the main job and the benchmark."""
