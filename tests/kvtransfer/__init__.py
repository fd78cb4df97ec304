"""Tests of kvtransfer, one file per concern, run on CPU (the nccl backend over gloo)."""
