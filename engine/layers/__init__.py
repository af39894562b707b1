"""Tensor-parallel-aware building blocks of the Step1 model."""
