"""Installs the network guard in every Python process the robustness tests start.

The tests put this folder first on PYTHONPATH; Python imports `sitecustomize` at start-up.
"""
import soe_netguard

soe_netguard.install()
