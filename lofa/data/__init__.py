"""Datasets: the synthetic MotionX-like world and readers of the MotionX layout."""
