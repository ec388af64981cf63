"""Scoring candidate stitches: pairwise KL between probe predictions (KLAS), linear CKA (baseline) and
the least-squares residual of each stitch's own fit (:mod:`klas.score.ls`)."""
from klas.score.cka import linear_cka_matrix
from klas.score.kl import chunked, kl_matrix, kl_matrix_naive
from klas.score.ls import LS_FIT_IMAGES, LS_SCORE_IMAGES, ls_residual

__all__ = ["LS_FIT_IMAGES", "LS_SCORE_IMAGES", "kl_matrix", "kl_matrix_naive", "linear_cka_matrix", "chunked",
           "ls_residual"]
