"""Scoring candidate stitches: pairwise KL between probe predictions (KLAS) and linear CKA (baseline)."""
from klas.score.cka import linear_cka_matrix
from klas.score.kl import chunked, kl_matrix, kl_matrix_naive

__all__ = ["kl_matrix", "kl_matrix_naive", "linear_cka_matrix", "chunked"]
