"""Plots and 3D renders saved as PNG."""
